"""pytest plumbing for the kvpress parity harness: the kvc binary, the result table, the
loud notice when the engine lacks a method.

The table is printed at the end of the run and, when KVC_PEER_REPORT names a file (ctest sets
it to <build>/tests/peer/kvpress_parity_report.txt), written there too.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kvpress_harness as harness  # noqa: E402

REPORT_KEY = pytest.StashKey[list]()


def pytest_configure(config):
    config.stash[REPORT_KEY] = []


@pytest.fixture(scope="session")
def kvc() -> Path:
    path = harness.find_kvc()
    if path is None:
        pytest.fail(
            "kvc not found: set KVC_BIN_DIR to the build's bin/ (ctest does), or build kvc "
            "into build*/bin of the repository",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def parity_report(pytestconfig) -> list:
    return pytestconfig.stash[REPORT_KEY]


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    # Deterministic CPU kernels; the machine has few cores and ctest runs tests side by side.
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    yield


def _render(results: list[harness.CaseResult], kvc_path: str) -> list[str]:
    lines = []
    lines.append(
        f"kvpress {harness.kvpress_version()} (torch {torch.__version__}, transformers "
        f"{harness._dist_version('transformers')}) vs {kvc_path} --local"
    )
    header = (
        f"{'method':<10} {'cases':>5} {'xfail':>5} {'heads':>6} {'match':>6} {'tie':>4} "
        f"{'prec':>4} {'FAIL':>5} {'bnd-tie':>7} {'trap2':>5} {'bf16nat':>7}"
    )
    lines.append(header)
    lines.append("-" * len(header))
    by_method = defaultdict(list)
    for r in results:
        by_method[r.case.method].append(r)
    totals = defaultdict(int)
    for method in harness.METHODS:
        rs = by_method.get(method, [])
        if not rs:
            continue
        row = {
            "cases": len(rs),
            "xfail": sum(r.unimplemented is not None for r in rs),
            "heads": sum(len(r.verdicts) for r in rs),
            "match": sum(r.count("match") for r in rs),
            "tie": sum(r.count("tie") for r in rs),
            "prec": sum(r.count("precision") for r in rs),
            "fail": sum(r.count("fail") for r in rs),
            "bnd": sum(r.boundary_ties for r in rs),
            "trap2": sum(r.trap2 for r in rs),
        }
        native = [r.bf16_native_diff for r in rs if r.bf16_native_diff is not None]
        native_heads = sum(r.case.kv_heads * r.case.layers for r in rs if r.bf16_native_diff is not None)
        native_text = f"{sum(native)}/{native_heads}" if native else "-"
        for k, v in row.items():
            totals[k] += v
        lines.append(
            f"{method:<10} {row['cases']:>5} {row['xfail']:>5} {row['heads']:>6} {row['match']:>6} "
            f"{row['tie']:>4} {row['prec']:>4} {row['fail']:>5} {row['bnd']:>7} {row['trap2']:>5} "
            f"{native_text:>7}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"{'total':<10} {totals['cases']:>5} {totals['xfail']:>5} {totals['heads']:>6} "
        f"{totals['match']:>6} {totals['tie']:>4} {totals['prec']:>4} {totals['fail']:>5} "
        f"{totals['bnd']:>7} {totals['trap2']:>5}"
    )
    lines.append(
        "heads: (layer, KV head) pairs compared; tie: differs only among tokens whose kvpress scores "
        "tie at the boundary; prec: kvpress fp32 rounding flipped a near-tie and fp64 agrees with "
        "kvc; bnd-tie: heads with a boundary tie in kvpress's scores (matched or not); trap2: cases "
        "where int(T*(1-cr)) < floor(T*keep); bf16nat: heads where kvpress run natively in bf16 "
        "keeps another set than on the fp32 upcast (information, DESIGN.md trap 1)."
    )
    notable = [(r, v) for r in results for v in r.verdicts if v.verdict != "match" or v.boundary_tie]
    if notable:
        lines.append("")
        lines.append("ties, near-ties and failures (case, layer, head, verdict, detail):")
        for r, v in notable:
            lines.append(f"  {r.case.name} L{v.layer} H{v.head} {v.verdict.upper()}"
                         f"{' (boundary tie)' if v.boundary_tie else ''} {v.detail}")
    missing = defaultdict(list)
    for r in results:
        if r.unimplemented is not None:
            missing[r.case.method].append(r)
    for method, rs in missing.items():
        lines.append("")
        lines.append(
            f"!!! ENGINE LACKS METHOD {method}: {len(rs)} case(s) xfailed (strict=False) because kvc "
            f"answered: {rs[0].unimplemented}"
        )
        lines.append("!!! The kvpress side of those cases ran; re-run when the engine implements it.")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = config.stash.get(REPORT_KEY, [])
    if not results:
        return
    path = harness.find_kvc()
    lines = _render(results, str(path) if path else "kvc")
    terminalreporter.write_sep("=", "kvpress parity")
    for line in lines:
        red = line.startswith("!!!")
        terminalreporter.write_line(line, red=red, bold=red)
    report = os.environ.get("KVC_PEER_REPORT")
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text("\n".join(lines) + "\n")
        terminalreporter.write_line(f"(written to {report})")
