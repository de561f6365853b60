"""The README's Python examples, run as written against a real kvcd with the package installed
by pip (not the source tree): `pip install ./client/python` into a fresh target directory,
then the README's compress block (only the address changed to the test's kvcd, its inputs
defined beforehand) must give the kept sets of `kvc compress --local` on the same tensors,
and the README's streaming block must run to its summary."""

import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO, bin_dir

PACKAGE = REPO / "client" / "python"
L, H, HQ, D, T = 4, 2, 4, 16, 300  # the README reads result.layers[3]


def readme_block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (PACKAGE / "README.md").read_text(), re.S)
    found = [b for b in blocks if marker in b]
    assert found, f"client/python/README.md has no python block containing {marker!r}"
    return found[0]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> pathlib.Path:
    """`pip install ./client/python` (a copy: the build writes into the source directory) into
    a target directory; no network, no dependencies (the venv has them, and setuptools for
    the build, which grpcio-tools and torch of tests/python/requirements.txt require)."""
    tmp = tmp_path_factory.mktemp("pip")
    src = tmp / "python"
    shutil.copytree(PACKAGE, src, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", "tests", "examples"))
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--no-build-isolation", "--disable-pip-version-check",
                    f"--target={site}", str(src)], check=True, capture_output=True)
    assert (site / "kvcompress" / "_proto" / "kvcompress_pb2.py").exists()
    return site


def run_with_installed(site, kvcd, tmp_path, code) -> None:
    script = tmp_path / "example.py"
    script.write_text(code.replace('"localhost:50051"', repr(kvcd)))
    # PYTHONPATH puts the pip-installed copy ahead of anything in the venv's site-packages.
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(site),
                                                       "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr


def test_readme_compress_example_matches_local(installed, kvcd, tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(11)
    tensors = {}
    for l in range(L):
        tensors[f"layers.{l}.keys"] = rng.standard_normal((H, T, D), dtype=np.float32)
        tensors[f"layers.{l}.values"] = rng.standard_normal((H, T, D), dtype=np.float32)
        tensors[f"layers.{l}.queries"] = rng.standard_normal((HQ, 64, D), dtype=np.float32)
    src = tmp_path / "in.safetensors"
    save_file(tensors, str(src), metadata={"format": "kvcompress.cache.v1",
                                          "num_query_heads": str(HQ)})
    prelude = textwrap.dedent(f"""
        import numpy as np
        from safetensors.numpy import load_file
        _t = load_file({str(src)!r})
        layers = [(_t[f"layers.{{l}}.keys"], _t[f"layers.{{l}}.values"],
                   _t[f"layers.{{l}}.queries"]) for l in range({L})]
        layers_a = [(k, v) for k, v, _ in layers]
        layers_b = [(k[:, :200], v[:, :200]) for k, v, _ in layers]
        """)
    postlude = textwrap.dedent(f"""
        import kvcompress
        assert kvcompress.__file__.startswith({str(installed)!r}), kvcompress.__file__
        np.savez({str(tmp_path / "got.npz")!r}, **{{
            **{{f"kept{{l}}": o.kept for l, o in enumerate(result.layers)}},
            **{{f"positions{{l}}": o.positions for l, o in enumerate(result.layers)}}}})
        """)
    run_with_installed(installed, kvcd, tmp_path,
                       prelude + readme_block("client.compress(") + postlude)

    dst = tmp_path / "out.safetensors"
    subprocess.run([str(bin_dir() / "kvc"), "compress", "--local", f"--input={src}",
                    f"--output={dst}", "--threads=1", "--method=snapkv", "--window=64",
                    "--kernel-size=5", "--pooling=avg", "--group-reduction=mean",
                    "--keep=0.25"], check=True, capture_output=True)
    local = load_file(str(dst))
    got = np.load(tmp_path / "got.npz")
    for l in range(L):
        assert list(got[f"kept{l}"]) == [int(T * 0.25)] * H
        np.testing.assert_array_equal(got[f"kept{l}"], local[f"layers.{l}.kept"])
        np.testing.assert_array_equal(got[f"positions{l}"], local[f"layers.{l}.positions"])


def test_readme_streaming_example_runs(installed, kvcd, tmp_path):
    pytest.importorskip("torch")
    prelude = textwrap.dedent("""
        import torch
        import kvcompress as kc
        client = kc.Client("localhost:50051", timeout=60)
        L, T = 3, 256
        def prefill_layer(l):
            g = torch.Generator().manual_seed(l)
            return (torch.randn(8, T, 128, generator=g).to(torch.bfloat16),
                    torch.randn(8, T, 128, generator=g).to(torch.bfloat16),
                    torch.randn(32, 64, 128, generator=g).to(torch.bfloat16))
        handed = []
        def hand_to_decode(out):
            assert out.layer == len(handed) and list(out.kept) == [64] * 8
            handed.append(out)
        """)
    postlude = "assert len(handed) == L and s.summary.tokens_kept == L * 8 * 64\n"
    run_with_installed(installed, kvcd, tmp_path,
                       prelude + readme_block("client.stream(") + postlude)
