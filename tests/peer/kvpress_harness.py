"""kvpress parity harness: runs kvpress presses and `kvc compress --local` on the same tensors.

For one case (a method and a cache geometry) it
  1. builds a synthetic cache with some attention structure (a sink, heavy hitters, peaked and
     flat query heads, a spread of key norms),
  2. builds a small transformers LlamaAttention per layer (identity q_proj, Llama RoPE) and drives
     the kvpress press's own `score()` / `compress()` with it, on the fp32 upcast of the cache
     (DESIGN.md §3, trap 1). SnapKV-family presses recompute the window queries from
     `hidden_states` with the module's q_proj and RoPE; exactly those post-RoPE queries are
     written to the cache file as `layers.{l}.queries`, so both sides see the same queries,
  3. takes the budget from kvpress (`compute_n_kept`, PyramidKV's `get_layer_budget`) and hands
     kvc the same absolute n with `--keep-tokens` (trap 2),
  4. compares kept sets per layer and KV head and classifies every difference:
       tie        every differing token has kvpress's score at the selection boundary, and that
                  score is shared by tokens on both sides of the boundary (kvpress's choice among
                  equal scores is arbitrary);
       precision  kvpress's fp32 scores put the differing tokens within 1e-5 (relative) of the
                  boundary, and an fp64 evaluation of kvpress's formula keeps what kvc kept
                  (kvpress rounded a near-tie the other way; kvc is right);
       fail       anything else.

bf16 caches: kvpress runs on the fp32 upcast, which must see the bf16 window queries bit for
bit. fp32 RoPE of bf16 inputs is not bf16-representable, so for bf16 the rotation happens where
a bf16 model applies it (in bf16, when the queries are produced) and the fp32 module gets the
rotated queries with an identity rotation (cos = 1, sin = 0). Out of interest the harness also
runs kvpress natively in bf16 and counts the heads whose kept sets differ from the fp32 upcast.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Optional

import safetensors.torch
import torch
from torch import nn
from torch.nn import functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaRotaryEmbedding,
    rotate_half,
)

import kvpress
from kvpress import AdaKVPress, KnormPress, PyramidKVPress, SnapKVPress, StreamingLLMPress
from kvpress.utils import compute_n_kept, get_prerope_query_states

METHODS = ("snapkv", "knorm", "streaming", "pyramidkv", "adakv")
ATTENTION_METHODS = ("snapkv", "pyramidkv", "adakv")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Relative distance from the selection boundary, in kvpress's fp32 scores, below which a
# difference may be a rounding flip (checked against fp64 before it is accepted).
NEAR_TIE_RTOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    method: str
    seed: int
    kv_heads: int
    groups: int
    head_dim: int
    tokens: int
    compression_ratio: float  # kvpress's parameter; keep ratio is 1 - compression_ratio
    dtype: str  # "fp32" | "bf16"
    window: int
    layers: int
    kernel_size: int = 5
    n_sink: int = 4
    beta: int = 20
    alpha: float = 0.2
    # Fraction of the tokens, one contiguous block from T/4 on, that share one key row per head
    # (exact ties in kvpress's scores, to exercise the tie path).
    tied_fraction: float = 0.0
    expect_boundary_ties: bool = False

    @property
    def query_heads(self) -> int:
        return self.kv_heads * self.groups

    def describe(self) -> str:
        return (
            f"{self.method} T={self.tokens} H_kv={self.kv_heads} G={self.groups} "
            f"D={self.head_dim} {self.dtype} cr={self.compression_ratio} W={self.window} "
            f"L={self.layers} seed={self.seed}"
        )


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class LayerData:
    keys: torch.Tensor  # [H_kv, T, D] in the case dtype (what the cache file holds)
    values: torch.Tensor  # [H_kv, T, D]
    queries: torch.Tensor  # [H_q, W, D] post-RoPE, case dtype, exactly what kvpress uses
    hidden_window: torch.Tensor  # [W, H_q*D] fp32: q_proj input of the fp32 module
    cos: torch.Tensor  # [1, T, D] fp32 position embeddings handed to kvpress
    sin: torch.Tensor


def _llama_config(case: Case, dtype: torch.dtype) -> LlamaConfig:
    hidden = case.query_heads * case.head_dim
    config = LlamaConfig(
        hidden_size=hidden,
        num_attention_heads=case.query_heads,
        num_key_value_heads=case.kv_heads,
        head_dim=case.head_dim,
        num_hidden_layers=case.layers,
        max_position_embeddings=max(case.tokens, 2048),
        vocab_size=16,
        intermediate_size=16,
        attention_bias=False,
        dtype=dtype,
    )
    # AdaKVPress refuses eager attention (it masks keys inside the attention call instead).
    config._attn_implementation = "sdpa"
    return config


def make_module(case: Case, layer_idx: int, dtype: torch.dtype) -> LlamaAttention:
    """A transformers LlamaAttention whose q_proj is the identity: hidden_states rows are the
    pre-RoPE queries of all heads, concatenated. Other projections stay on the meta device
    (kvpress never calls them)."""
    config = _llama_config(case, dtype)
    with torch.device("meta"):
        module = LlamaAttention(config, layer_idx)
    hidden = config.hidden_size
    q_proj = nn.Linear(hidden, hidden, bias=False, device="meta")
    q_proj.weight = nn.Parameter(_identity(hidden, dtype), requires_grad=False)
    module.q_proj = q_proj
    return module


@functools.lru_cache(maxsize=2)
def _identity(size: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.eye(size, dtype=dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """kvpress's rotation (SnapKVPress.compute_window_attention): x [.., H, W, D], cos [1, W, D]."""
    return (x * cos.unsqueeze(1)) + (rotate_half(x) * sin.unsqueeze(1))


def make_layer(case: Case, layer: int) -> LayerData:
    gen = torch.Generator().manual_seed(case.seed * 1009 + layer)
    H, G, D, T, W = case.kv_heads, case.groups, case.head_dim, case.tokens, case.window
    Hq = H * G
    f64 = torch.float64
    dtype = DTYPES[case.dtype]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=f64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=f64)

    # Keys: Gaussian with a per-token norm spread; heavy hitters (and a sink at 0) carry a
    # per-KV-head salient direction u that some query heads look for.
    u = randn(H, D)
    u = u / u.norm(dim=-1, keepdim=True)
    r = math.sqrt(2.0) * D**0.25  # r*r/sqrt(D) = 2: salience c, interest a -> logit boost 2ac
    keys = randn(H, T, D) * torch.exp(0.25 * randn(H, T, 1))
    salience = (rand(H, T) < 0.03).to(f64) * (1.0 + 2.0 * rand(H, T))
    salience[:, 0] = 3.0
    keys = keys + salience[..., None] * r * u[:, None, :]
    if case.tied_fraction > 0:
        start, length = T // 4, int(T * case.tied_fraction)
        norms = keys.norm(dim=-1)
        median = norms.median(dim=-1).indices  # a key of median norm per head
        shared = keys[torch.arange(H), median]
        keys[:, start : start + length] = shared[:, None, :]
    values = randn(H, T, D)

    # Post-RoPE window queries we want: per query head an interest a in u (peaked or flat heads).
    interest = 2.0 * rand(Hq)
    u_q = u.repeat_interleave(G, dim=0)  # query head h belongs to KV head h // G (repeat_kv)
    target = 0.5 * randn(Hq, W, D) + interest[:, None, None] * r * u_q[:, None, :]

    config = _llama_config(case, torch.float32)
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.arange(T).unsqueeze(0)
    if case.dtype == "fp32":
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
        c64, s64 = cos[:, -W:].to(f64), sin[:, -W:].to(f64)
        pre = (target.unsqueeze(0) * c64.unsqueeze(1) - rotate_half(target.unsqueeze(0)) * s64.unsqueeze(1))[0]
        hidden_window = pre.to(torch.float32).transpose(0, 1).reshape(W, Hq * D)
        # Exactly what kvpress computes from hidden_states and position_embeddings.
        module = make_module(case, layer, torch.float32)
        q = get_prerope_query_states(module, hidden_window.unsqueeze(0))
        queries = _rope(q, cos[:, -W:], sin[:, -W:])[0].contiguous()
    else:
        # A bf16 model: pre-RoPE queries in bf16, rotated in bf16.
        cos_b, sin_b = rotary(torch.zeros(1, dtype=dtype), positions)
        c64, s64 = cos_b[:, -W:].to(f64), sin_b[:, -W:].to(f64)
        pre = (target.unsqueeze(0) * c64.unsqueeze(1) - rotate_half(target.unsqueeze(0)) * s64.unsqueeze(1))[0]
        queries = _rope(pre.to(dtype).unsqueeze(0), cos_b[:, -W:], sin_b[:, -W:])[0].contiguous()
        hidden_window = queries.to(torch.float32).transpose(0, 1).reshape(W, Hq * D)
        cos = torch.ones(1, T, D, dtype=torch.float32)
        sin = torch.zeros(1, T, D, dtype=torch.float32)
    return LayerData(
        keys=keys.to(dtype).contiguous(),
        values=values.to(dtype).contiguous(),
        queries=queries.to(dtype).contiguous(),
        hidden_window=hidden_window.contiguous(),
        cos=cos.contiguous(),
        sin=sin.contiguous(),
    )


def make_cache(case: Case) -> list[LayerData]:
    """The cache depends on the geometry and seed, not on the method: consecutive cases of one
    configuration share it."""
    key = dataclasses.replace(case, name="", method="", compression_ratio=0.0, expect_boundary_ties=False)
    return _make_cache(key)


@functools.lru_cache(maxsize=1)
def _make_cache(case: Case) -> list[LayerData]:
    return [make_layer(case, layer) for layer in range(case.layers)]


def write_cache_file(case: Case, layers: list[LayerData], path: Path) -> None:
    tensors = {}
    for l, data in enumerate(layers):
        tensors[f"layers.{l}.keys"] = data.keys
        tensors[f"layers.{l}.values"] = data.values
        if case.method in ATTENTION_METHODS:
            tensors[f"layers.{l}.queries"] = data.queries
    safetensors.torch.save_file(
        tensors, str(path), metadata={"format": "kvcompress.cache.v1", "source": "kvpress parity harness"}
    )


# --------------------------------------------------------------------------- kvpress side


def make_press(case: Case):
    cr = case.compression_ratio
    if case.method == "snapkv":
        return SnapKVPress(compression_ratio=cr, window_size=case.window, kernel_size=case.kernel_size)
    if case.method == "knorm":
        return KnormPress(compression_ratio=cr)
    if case.method == "streaming":
        return StreamingLLMPress(compression_ratio=cr, n_sink=case.n_sink)
    if case.method == "pyramidkv":
        return PyramidKVPress(
            compression_ratio=cr, window_size=case.window, kernel_size=case.kernel_size, beta=case.beta
        )
    if case.method == "adakv":
        inner = SnapKVPress(compression_ratio=cr, window_size=case.window, kernel_size=case.kernel_size)
        return AdaKVPress(press=inner, alpha_safeguard=case.alpha)
    raise ValueError(case.method)


@dataclasses.dataclass
class KvpressLayer:
    budget: int  # tokens per head (AdaKV: average per head)
    kept: list[torch.Tensor]  # per KV head, sorted int64 positions
    scores: torch.Tensor  # [H_kv, T] fp32 scores the selection used (AdaKV: after safeguard)
    pre_scores: Optional[torch.Tensor] = None  # AdaKV: scores before the safeguard scatter
    n_safe: int = 0


def _kvpress_inputs(case: Case, data: LayerData, layer: int, dtype: torch.dtype):
    module = make_module(case, layer, dtype)
    T, Hq, D = case.tokens, case.query_heads, case.head_dim
    # Only the last W rows of hidden_states are read (q_proj of the window); the rest is left
    # unwritten so that an 8K x 4096 buffer costs no memory.
    hidden = torch.empty(1, T, Hq * D, dtype=dtype)
    hidden[0, -case.window :] = data.hidden_window.to(dtype)
    keys = data.keys.to(dtype).unsqueeze(0)
    values = data.values.to(dtype).unsqueeze(0)
    kwargs = {"position_embeddings": (data.cos.to(dtype), data.sin.to(dtype))}
    return module, hidden, keys, values, kwargs


@torch.no_grad()
def run_kvpress_layer(case: Case, data: LayerData, layer: int, dtype=torch.float32) -> KvpressLayer:
    press = make_press(case)
    module, hidden, keys, values, kwargs = _kvpress_inputs(case, data, layer, dtype)
    H, T, D = case.kv_heads, case.tokens, case.head_dim

    # compress() computes the scores itself; keep a copy of what its score() returned.
    scorer = press.press if case.method == "adakv" else press
    captured = []
    score = scorer.score

    def capture(*args, **kwargs):
        result = score(*args, **kwargs)
        captured.append(result[0].float().clone())
        return result

    scorer.score = capture

    if case.method == "adakv":
        press.compress(module, hidden, keys, values, None, kwargs)
        (pre,) = captured
        _, heads, seqs = module.masked_key_indices
        mask = torch.ones(H, T, dtype=torch.bool)
        mask[heads, seqs] = False
        kept = [torch.nonzero(mask[h]).flatten() for h in range(H)]
        n = compute_n_kept(T, case.compression_ratio)
        n_safe = int(n * case.alpha)
        if case.alpha > 0:
            n_safe = max(1, n_safe) if n > 0 else 0
        # The safeguard as AdaKVPress applies it, for tie analysis.
        post = pre.clone().to(dtype)
        top = torch.topk(post, n_safe, dim=-1).indices
        post.scatter_(-1, top, torch.finfo(post.dtype).max)
        return KvpressLayer(budget=n, kept=kept, scores=post.float(), pre_scores=pre, n_safe=n_safe)

    if case.method == "pyramidkv":
        budget = press.get_layer_budget(module, T)
    else:
        budget = compute_n_kept(T, case.compression_ratio)
    # Drive compress() itself; values carry their own position so the gather reveals the kept set.
    positions = torch.arange(T, dtype=torch.float64).view(1, 1, T, 1).expand(1, H, T, D)
    _, kept_values = press.compress(module, hidden, keys, positions, None, kwargs)
    (scores,) = captured
    kept = [kept_values[0, h, :, 0].long().sort().values for h in range(H)]
    assert all(k.numel() == budget for k in kept), "kvpress kept count differs from its budget"
    return KvpressLayer(budget=budget, kept=kept, scores=scores)


# --------------------------------------------------------------------------- fp64 reference


def snapkv_scores_fp64(case: Case, data: LayerData) -> torch.Tensor:
    """kvpress's SnapKV formula in float64 on the same (fp32-upcast) tensors; window = +inf."""
    H, G, T, W, D = case.kv_heads, case.groups, case.tokens, case.window, case.head_dim
    k = data.keys.to(torch.float64).repeat_interleave(G, dim=0)
    q = data.queries.to(torch.float64)
    logits = q @ k.transpose(1, 2) / math.sqrt(D)
    i = torch.arange(W).unsqueeze(1)
    j = torch.arange(T).unsqueeze(0)
    logits = logits.masked_fill(j > T - W + i, float("-inf"))
    attn = torch.softmax(logits, dim=-1)[..., : T - W]
    s = attn.mean(dim=1)
    s = F.avg_pool1d(s.unsqueeze(0), kernel_size=case.kernel_size, padding=case.kernel_size // 2, stride=1)[0]
    s = s.view(H, G, T - W).mean(1)
    return torch.cat([s, torch.full((H, W), float("inf"), dtype=torch.float64)], dim=1)


def reference_scores_fp64(case: Case, data: LayerData) -> torch.Tensor:
    if case.method in ATTENTION_METHODS:
        return snapkv_scores_fp64(case, data)
    if case.method == "knorm":
        return -torch.linalg.vector_norm(data.keys.to(torch.float64), dim=-1)
    if case.method == "streaming":
        T = case.tokens
        s = torch.arange(T, dtype=torch.float64).expand(case.kv_heads, T).clone()
        s[:, : case.n_sink] = float("inf")
        return s
    raise ValueError(case.method)


def _top_set(scores: torch.Tensor, n: int) -> set[int]:
    """Top n by score, ties to the lower index (the kvcompress rule)."""
    return set(torch.sort(-scores, stable=True).indices[:n].tolist())


def reference_kept_fp64(case: Case, layer: KvpressLayer, ref: torch.Tensor) -> list[set[int]]:
    H, T = case.kv_heads, case.tokens
    if case.method != "adakv":
        return [_top_set(ref[h], layer.budget) for h in range(H)]
    post = ref.clone()
    for h in range(H):
        for t in _top_set(post[h], layer.n_safe):
            post[h, t] = float("inf")
    flat = _top_set(post.flatten(), H * layer.budget)
    return [{i - h * T for i in flat if h * T <= i < (h + 1) * T} for h in range(H)]


# --------------------------------------------------------------------------- kvc side


class KvcUnimplemented(Exception):
    pass


class KvpressTieWarning(UserWarning):
    """kvpress's scores tie across a selection boundary: its choice there is arbitrary."""


class KvpressPrecisionWarning(UserWarning):
    """kvpress's fp32 scores put a near-tie the other way; fp64 sides with kvcompress."""


@dataclasses.dataclass
class KvcLayer:
    kept: list[torch.Tensor]  # per KV head, int64 positions as written (ascending expected)
    keys: torch.Tensor  # [sum kept, D]
    values: torch.Tensor


def kvc_arguments(case: Case, keep_tokens: int) -> list[str]:
    args = ["--method", case.method, "--keep-tokens", str(keep_tokens)]
    if case.method in ATTENTION_METHODS:
        args += ["--window", str(case.window), "--kernel-size", str(case.kernel_size)]
    if case.method == "streaming":
        args += ["--sinks", str(case.n_sink)]
    if case.method == "pyramidkv":
        args += ["--beta", str(case.beta)]
    if case.method == "adakv":
        args += ["--alpha", str(case.alpha)]
    return args


def run_kvc(kvc: Path, case: Case, keep_tokens: int, input_path: Path, output_path: Path, extra_args=()):
    command = [str(kvc), "compress", "--local", "--input", str(input_path), "--output", str(output_path)]
    args = kvc_arguments(case, keep_tokens)
    extra = list(extra_args)
    for i in range(0, len(extra), 2):  # --flag value pairs override the case's own
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i : i + 2]
    command += args
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        text = (proc.stderr + proc.stdout).strip()
        if "UNIMPLEMENTED" in text:
            raise KvcUnimplemented(next(line for line in text.splitlines() if "UNIMPLEMENTED" in line).strip())
        raise RuntimeError(f"kvc failed (exit {proc.returncode}): {' '.join(command)}\n{text}")
    tensors = safetensors.torch.load_file(str(output_path))
    layers = []
    for l in range(case.layers):
        counts = tensors[f"layers.{l}.kept"].tolist()
        positions = tensors[f"layers.{l}.positions"].long()
        assert len(counts) == case.kv_heads, f"layer {l}: kept has {len(counts)} heads"
        assert sum(counts) == positions.numel(), f"layer {l}: kept counts do not sum to positions"
        kept = list(torch.split(positions, counts))
        layers.append(KvcLayer(kept=kept, keys=tensors[f"layers.{l}.keys"], values=tensors[f"layers.{l}.values"]))
    return layers, " ".join(command)


# --------------------------------------------------------------------------- comparison


@dataclasses.dataclass
class HeadVerdict:
    layer: int
    head: int
    verdict: str  # "match" | "tie" | "precision" | "fail"
    boundary_tie: bool  # kvpress scores tie across the selection boundary (reported either way)
    detail: str = ""


def _boundary(scores: torch.Tensor, n: int):
    """(last kept score, first dropped score) of a descending selection of n; None past the end."""
    if n <= 0 or n >= scores.numel():
        return None
    top = torch.topk(scores, n + 1).values
    return top[n - 1].item(), top[n].item()


def _near(x: float, b: float) -> bool:
    return abs(x - b) <= NEAR_TIE_RTOL * max(abs(b), abs(x))


def compare_layer(case: Case, l: int, kp: KvpressLayer, kv: KvcLayer, ref_kept: list[set[int]], data: LayerData):
    """Verdicts per head (AdaKV: the layer's selection is global; verdicts still per head)."""
    H, T = case.kv_heads, case.tokens
    verdicts: list[HeadVerdict] = []
    # Rows must be the input rows of the kept positions, byte for byte.
    offset = 0
    for h in range(H):
        pos = kv.kept[h]
        assert bool((pos[1:] > pos[:-1]).all()), f"layer {l} head {h}: kvc positions not ascending"
        rows = slice(offset, offset + pos.numel())
        assert torch.equal(kv.keys[rows], data.keys[h, pos]), f"layer {l} head {h}: kvc key rows differ from input"
        assert torch.equal(kv.values[rows], data.values[h, pos]), f"layer {l} head {h}: kvc value rows differ"
        offset += pos.numel()

    # Boundary ties in kvpress's scores.
    if case.method == "adakv":
        g = _boundary(kp.scores.flatten(), H * kp.budget)
        global_tie = g is not None and g[0] == g[1]
        safe = [_boundary(kp.pre_scores[h], kp.n_safe) for h in range(H)]
    for h in range(H):
        P = set(kp.kept[h].tolist())
        C = set(kv.kept[h].tolist())
        if case.method == "adakv":
            tie_values = [g[0]] if global_tie else []
            # A tie at the safeguard boundary matters only if the tied score is not above the
            # global cut anyway (e.g. window tokens, all at kvpress's max + 1, are kept regardless).
            pre_tie = (
                [safe[h][0]]
                if safe[h] is not None and safe[h][0] == safe[h][1] and (g is None or safe[h][0] <= g[0])
                else []
            )
            boundary_tie = bool(tie_values or pre_tie)
            bounds = [g[0]] if g is not None else []
        else:
            b = _boundary(kp.scores[h], kp.budget)
            tie_values = [b[0]] if b is not None and b[0] == b[1] else []
            pre_tie = []
            boundary_tie = bool(tie_values)
            bounds = [b[0]] if b is not None else []
        if P == C:
            verdicts.append(HeadVerdict(l, h, "match", boundary_tie))
            continue
        only_p, only_c = sorted(P - C), sorted(C - P)
        diff = only_p + only_c
        s = kp.scores[h]
        detail = (
            f"kvpress keeps {len(P)}, kvc keeps {len(C)}; kvpress-only {only_p[:8]}"
            f"{'...' if len(only_p) > 8 else ''}, kvc-only {only_c[:8]}{'...' if len(only_c) > 8 else ''}; "
            f"kvpress scores {[s[t].item() for t in only_p[:4]]} vs {[s[t].item() for t in only_c[:4]]}"
        )
        if len(P) == len(C) or case.method == "adakv":
            explained = all(
                s[t].item() in tie_values or (kp.pre_scores is not None and kp.pre_scores[h, t].item() in pre_tie)
                for t in diff
            )
            if explained and (tie_values or pre_tie):
                verdicts.append(HeadVerdict(l, h, "tie", True, detail))
                continue
            near = bounds and all(any(_near(s[t].item(), b) for b in bounds) for t in diff)
            fp64_agrees = all((t in C) == (t in ref_kept[h]) for t in diff)
            if near and fp64_agrees:
                verdicts.append(HeadVerdict(l, h, "precision", boundary_tie, detail + "; fp64 agrees with kvc"))
                continue
            if fp64_agrees:
                detail += "; fp64 reference agrees with kvc (kvpress differs beyond rounding?)"
            else:
                detail += "; fp64 reference agrees with kvpress"
        verdicts.append(HeadVerdict(l, h, "fail", boundary_tie, detail))
    return verdicts


# --------------------------------------------------------------------------- one case


@dataclasses.dataclass
class CaseResult:
    case: Case
    budgets: list[int]
    verdicts: list[HeadVerdict]
    trap2: bool  # kvpress's int(T*(1-cr)) is one less than floor(T*keep)
    bf16_native_diff: Optional[int] = None  # heads where native-bf16 kvpress keeps another set
    unimplemented: Optional[str] = None
    command: str = ""

    def count(self, verdict: str) -> int:
        return sum(v.verdict == verdict for v in self.verdicts)

    @property
    def boundary_ties(self) -> int:
        return sum(v.boundary_tie for v in self.verdicts)


def floor_keep(case: Case) -> int:
    keep = 1 - Fraction(str(case.compression_ratio))
    return math.floor(case.tokens * keep)


def run_case(case: Case, kvc: Path, workdir: Path, native_bf16: bool = True, extra_kvc_args=()) -> CaseResult:
    layers = make_cache(case)
    input_path = workdir / "input.safetensors"
    output_path = workdir / "output.safetensors"
    write_cache_file(case, layers, input_path)

    n = compute_n_kept(case.tokens, case.compression_ratio)
    result = CaseResult(case=case, budgets=[], verdicts=[], trap2=n != floor_keep(case))
    kvpress_layers = [run_kvpress_layer(case, data, l) for l, data in enumerate(layers)]
    result.budgets = [kp.budget for kp in kvpress_layers]

    # bf16 matmuls are slow on CPU: the native-bf16 comparison (information only) skips big cases.
    small = case.tokens * case.query_heads * case.head_dim <= 1 << 23
    if native_bf16 and case.dtype == "bf16" and small:
        diff = 0
        for l, data in enumerate(layers):
            native = run_kvpress_layer(case, data, l, dtype=torch.bfloat16)
            diff += sum(not torch.equal(a, b) for a, b in zip(native.kept, kvpress_layers[l].kept))
        result.bf16_native_diff = diff

    try:
        kvc_layers, result.command = run_kvc(kvc, case, n, input_path, output_path, extra_kvc_args)
    except KvcUnimplemented as error:
        result.unimplemented = str(error)
        return result
    for l, (kp, kv, data) in enumerate(zip(kvpress_layers, kvc_layers, layers)):
        ref_kept = reference_kept_fp64(case, kp, reference_scores_fp64(case, data))
        result.verdicts += compare_layer(case, l, kp, kv, ref_kept, data)
    return result


def kvpress_version() -> str:
    return getattr(kvpress, "__version__", None) or _dist_version("kvpress")


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def find_kvc() -> Optional[Path]:
    bin_dir = os.environ.get("KVC_BIN_DIR")
    if bin_dir:
        path = Path(bin_dir) / "kvc"
        return path if path.exists() else None
    root = Path(__file__).resolve().parents[2]
    found = sorted(root.glob("build*/bin/kvc"), key=lambda p: p.stat().st_mtime, reverse=True)
    return found[0] if found else None
