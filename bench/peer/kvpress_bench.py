#!/usr/bin/env python3
"""kvpress's own time on the GPU benchmark's workload (issue 4: "kvpress's time on the same
tensors in the same run").

For each T it builds Llama-3.1-8B-shaped layers on the device (32 query / 8 KV heads,
head_dim 128, hidden 4096, bf16) from a fixed seed — per layer a transformers LlamaAttention
with a random q_proj (the only projection kvpress touches; k/v/o_proj stay on the meta device),
keys and values [1, 8, T, 128], hidden_states [1, T, 4096] and Llama-3.1 RoPE cos/sin — and
times `press.compress(module, hidden_states, keys, values, None, kwargs)`, the call that
kvpress's forward hook (BasePress.forward_hook) makes once per attention layer during prefill.
That call does the whole press: for SnapKV-family presses the q_proj of the last `window`
hidden rows, RoPE, repeat_kv, window attention + softmax, mean, avg pooling, the group mean,
then top-k and the gather of the kept K and V rows; for AdaKV the scores and the two top-ks
(it masks instead of gathering).

  per layer   median of single calls, rotating through the layers (no call sees the previous
              call's layer data in L2), after warm-up;
  whole model median of `--layers` real calls in a row, one per layer (PyramidKV's budget
              depends on layer_idx, so every layer's real budget is paid).

GPU timing is CUDA events around the Python call (host work, every kernel; SnapKV's
`scores.max().item()` synchronises inside it), each sample starting from an idle device. On
CPU (smoke test) it is wall clock.

  python3 bench/peer/kvpress_bench.py --out kvpress.json               # GPU, issue 4 shapes
  python3 bench/peer/kvpress_bench.py --device cpu --tokens 512 --layers 2 --out /tmp/k.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

STUB_DIR = Path(__file__).resolve().parent / "stubs"
# Imported by kvpress/__init__ only for presses this benchmark does not run (DuoAttention,
# LUKV, ExpectedAttentionStats). If the device image lacks them and the carried wheels did not
# provide them, stand-ins from bench/peer/stubs/ are put on the path (recorded in the JSON).
STUBBABLE = {"cachetools", "datasets", "fire", "dill", "multiprocess", "termcolor"}


def import_kvpress():
    stubbed: list[str] = []
    for _ in range(len(STUBBABLE) + 1):
        try:
            module = importlib.import_module("kvpress")
            used = sorted(name for name, m in sys.modules.items()
                          if "." not in name and str(STUB_DIR) in str(getattr(m, "__file__", "") or ""))
            return module, used
        except ModuleNotFoundError as error:
            missing = (error.name or "").split(".")[0]
            if missing not in STUBBABLE or missing in stubbed:
                raise
            for name in list(sys.modules):
                if name == "kvpress" or name.startswith("kvpress.") or name.split(".")[0] in STUBBABLE:
                    del sys.modules[name]
            if str(STUB_DIR) not in sys.path:
                sys.path.append(str(STUB_DIR))
            stubbed.append(missing)
            print(f"warning: kvpress import needs '{missing}', not installed: using the stand-in "
                  f"in {STUB_DIR} (only unused presses import it)", file=sys.stderr)
    raise RuntimeError("could not import kvpress")


kvpress, STUBBED = import_kvpress()
import transformers  # noqa: E402
from kvpress import AdaKVPress, KnormPress, PyramidKVPress, SnapKVPress, StreamingLLMPress  # noqa: E402
from kvpress.utils import compute_n_kept  # noqa: E402
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding  # noqa: E402

PRESSES = ("snapkv", "knorm", "streaming", "pyramidkv", "adakv")


@dataclasses.dataclass
class Shape:
    layers: int = 32
    query_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    hidden: int = 4096
    window: int = 64
    kernel: int = 5
    n_sink: int = 4
    beta: int = 20
    alpha: float = 0.2
    compression_ratio: float = 0.9  # keep 0.1


def make_press(name: str, s: Shape):
    cr = s.compression_ratio
    if name == "snapkv":
        return SnapKVPress(compression_ratio=cr, window_size=s.window, kernel_size=s.kernel)
    if name == "knorm":
        return KnormPress(compression_ratio=cr)
    if name == "streaming":
        return StreamingLLMPress(compression_ratio=cr, n_sink=s.n_sink)
    if name == "pyramidkv":
        return PyramidKVPress(compression_ratio=cr, window_size=s.window, kernel_size=s.kernel, beta=s.beta)
    if name == "adakv":
        inner = SnapKVPress(compression_ratio=cr, window_size=s.window, kernel_size=s.kernel)
        return AdaKVPress(press=inner, alpha_safeguard=s.alpha)
    raise ValueError(f"unknown press {name!r}; known: {', '.join(PRESSES)}")


def llama_config(s: Shape, tokens: int, dtype: torch.dtype) -> LlamaConfig:
    common = dict(
        hidden_size=s.hidden,
        num_attention_heads=s.query_heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        num_hidden_layers=s.layers,
        max_position_embeddings=max(131072, tokens),
        vocab_size=16,
        intermediate_size=16,
        attention_bias=False,
        dtype=dtype,
    )
    # Llama-3.1's RoPE (only the cos/sin values depend on it, not the work kvpress does).
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    try:
        config = LlamaConfig(rope_parameters=llama3, **common)
        LlamaRotaryEmbedding(config)
    except Exception:  # noqa: BLE001 - older transformers spell it rope_scaling/rope_theta
        config = LlamaConfig(**common)
    # AdaKVPress refuses eager attention; kvpress's pipeline runs sdpa by default.
    config._attn_implementation = "sdpa"
    return config


class Workload:
    """All layers' tensors for one T, on the device, from a fixed seed."""

    def __init__(self, s: Shape, tokens: int, device: torch.device, dtype: torch.dtype, seed: int):
        self.s, self.tokens, self.device = s, tokens, device
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + tokens)
        config = llama_config(s, tokens, dtype)
        self.config = config

        def randn(*shape, scale=1.0):
            t = torch.randn(*shape, generator=gen, device=device, dtype=dtype)
            return t.mul_(scale) if scale != 1.0 else t

        self.modules, self.keys, self.values = [], [], []
        q_out = s.query_heads * s.head_dim
        for layer in range(s.layers):
            with torch.device("meta"):
                module = LlamaAttention(config, layer)
            q_proj = nn.Linear(s.hidden, q_out, bias=False, device=device, dtype=dtype)
            # Queries about N(0, 4), like gpu_bench's window queries (scale 2).
            q_proj.weight = nn.Parameter(randn(q_out, s.hidden, scale=2.0 / s.hidden**0.5), requires_grad=False)
            module.q_proj = q_proj
            self.modules.append(module.eval())
            self.keys.append(randn(1, s.kv_heads, tokens, s.head_dim))
            self.values.append(randn(1, s.kv_heads, tokens, s.head_dim))
        # One buffer, layer l's hidden_states = rows [l·W, l·W + T): every layer gets a real
        # contiguous [1, T, hidden] tensor whose last W rows (all kvpress reads) are its own,
        # without 32 × T × hidden of memory.
        self.hidden_buffer = randn(1, tokens + s.window * (s.layers - 1), s.hidden)
        self.hidden = [self.hidden_buffer[:, s.window * l : s.window * l + tokens] for l in range(s.layers)]
        rotary = LlamaRotaryEmbedding(config).to(device)
        positions = torch.arange(tokens, device=device).unsqueeze(0)
        cos, sin = rotary(self.hidden[0], positions)
        # What LlamaModel hands every decoder layer (and so the hook's kwargs).
        self.kwargs = {"position_embeddings": (cos, sin), "cache_position": positions[0], "past_key_values": None}

    def call(self, press, layer: int):
        return press.compress(self.modules[layer], self.hidden[layer], self.keys[layer], self.values[layer],
                              None, self.kwargs)


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, fn) -> float:
        """Milliseconds of fn() from an idle device."""
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def kept_tokens(press, name: str, work: Workload, layer: int) -> int:
    """Tokens kept per KV head in `layer` (AdaKV: on average over heads)."""
    if name == "pyramidkv":
        return press.get_layer_budget(work.modules[layer], work.tokens)
    return compute_n_kept(work.tokens, press.compression_ratio)


def bench_press(name: str, work: Workload, timer: Timer, iterations: int, warmup: int) -> dict:
    s = work.s
    press = make_press(name, s)
    layers = s.layers

    def whole():
        for layer in range(layers):
            out = work.call(press, layer)
            del out

    # Check the output once (shapes as kvpress's hook would write them back).
    out_k, out_v = work.call(press, 0)
    if name != "adakv":
        expected = kept_tokens(press, name, work, 0)
        assert tuple(out_k.shape) == (1, s.kv_heads, expected, s.head_dim), (name, tuple(out_k.shape), expected)
        assert out_v.shape == out_k.shape
    else:
        assert out_k is work.keys[0]
    del out_k, out_v

    for _ in range(warmup):
        whole()
    if timer.cuda:
        torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated() if timer.cuda else 0

    single_samples = max(iterations, layers)
    single = []
    for i in range(single_samples):
        layer = i % layers
        single.append(timer.measure(lambda: work.call(press, layer)))
    model = [timer.measure(whole) for _ in range(iterations)]
    peak = (torch.cuda.max_memory_allocated() - base_mem) if timer.cuda else None

    kept = [kept_tokens(press, name, work, layer) for layer in range(layers)]
    return {
        "press": name,
        "press_repr": repr(press),
        "tokens": work.tokens,
        "layers": layers,
        "per_layer_ms": statistics.median(single),
        "per_layer_ms_min": min(single),
        "per_layer_ms_max": max(single),
        "per_layer_samples": len(single),
        "whole_model_ms": statistics.median(model),
        "whole_model_ms_min": min(model),
        "whole_model_ms_max": max(model),
        "whole_model_samples": len(model),
        "whole_model_per_layer_ms": statistics.median(model) / layers,
        "kept_tokens_per_head": kept if name == "pyramidkv" else kept[0],
        "peak_workspace_bytes": peak,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="4096,16384,32768,65536,131072", help="comma-separated T list")
    p.add_argument("--presses", default=",".join(PRESSES), help=f"comma-separated, from {','.join(PRESSES)}")
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--query-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128, help="hidden size = query heads × head dim")
    p.add_argument("--iterations", type=int, default=10,
                   help="whole-model samples; single-layer samples are max(iterations, layers)")
    p.add_argument("--warmup", type=int, default=2, help="whole-model passes before timing")
    p.add_argument("--keep", type=float, default=0.1, help="keep ratio; kvpress compression_ratio = 1 - keep")
    p.add_argument("--seed", type=int, default=4)
    p.add_argument("--out", default=None, help="JSON output path")
    return p.parse_args(argv)


def fmt_tokens(t: int) -> str:
    return f"{t // 1024}K" if t % 1024 == 0 else str(t)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    tokens_list = [int(t) for t in args.tokens.split(",") if t]
    presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    for name in presses:
        if name not in PRESSES:
            print(f"unknown press {name!r}; known: {', '.join(PRESSES)}", file=sys.stderr)
            return 2
    shape = Shape(layers=args.layers, query_heads=args.query_heads, kv_heads=args.kv_heads,
                  head_dim=args.head_dim, hidden=args.query_heads * args.head_dim,
                  compression_ratio=round(1.0 - args.keep, 12))
    timer = Timer(device)
    torch.set_grad_enabled(False)

    meta = {
        "what": "kvpress press.compress per attention layer (the call its forward hook makes)",
        "kvpress": getattr(kvpress, "__version__", None) or _dist_version("kvpress"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "stubbed_modules": STUBBED,
        "shape": dataclasses.asdict(shape),
        "dtype": "bfloat16",
        "seed": args.seed,
        "iterations": args.iterations,
        "warmup": args.warmup,
        "timing": "CUDA events around the Python call from an idle device" if timer.cuda else "wall clock",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    print(json.dumps(meta), flush=True)
    results = []
    for tokens in tokens_list:
        work = None
        try:
            t0 = time.perf_counter()
            work = Workload(shape, tokens, device, torch.bfloat16, args.seed)
            timer.sync()
            print(f"T={tokens}: tensors built in {time.perf_counter() - t0:.1f} s", flush=True)
            for name in presses:
                try:
                    r = bench_press(name, work, timer, args.iterations, args.warmup)
                except torch.OutOfMemoryError as error:  # noqa: PERF203
                    r = {"press": name, "tokens": tokens, "error": f"out of memory: {error}"}
                    if timer.cuda:
                        torch.cuda.empty_cache()
                results.append(r)
                if "error" in r:
                    print(f"  {name:10s} T={tokens}: {r['error'][:200]}", flush=True)
                else:
                    print(f"  {name:10s} T={tokens}: per layer {r['per_layer_ms']:.3f} ms, whole model "
                          f"{r['whole_model_ms']:.2f} ms", flush=True)
        except torch.OutOfMemoryError as error:
            results.append({"press": "*", "tokens": tokens, "error": f"out of memory building tensors: {error}"})
            print(f"T={tokens}: out of memory building tensors", flush=True)
        finally:
            del work
            if timer.cuda:
                torch.cuda.empty_cache()

    print()
    print(f"kvpress {meta['kvpress']}, transformers {meta['transformers']}, torch {meta['torch']}, "
          f"{meta['device']}; {shape.layers} layers, keep {args.keep}")
    print()
    print(f"| press | T | per layer (ms) | whole model, {shape.layers} layers (ms) | whole model / {shape.layers} (ms) |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['press']} | {fmt_tokens(r['tokens'])} | — | — | {r['error'][:60]} |")
        else:
            print(f"| {r['press']} | {fmt_tokens(r['tokens'])} | {r['per_layer_ms']:.4f} | "
                  f"{r['whole_model_ms']:.3f} | {r['whole_model_per_layer_ms']:.4f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        print(f"\nwrote {args.out}")
    return 1 if any("error" in r for r in results) else 0


def _dist_version(name: str):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
