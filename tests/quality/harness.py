"""Quality harness: real K/V/queries from a numpy Llama -> `kvc compress --local` -> decode
the true continuation on the compressed cache -> log-likelihood and attention-output error
against the full cache. Used by tests/quality/test_stories_quality.py (CI, stories260K) and
bench/quality/run_quality.py (the full table in bench/RESULTS.md).

Protocol for one text (a "sample"):
  * tokens[0:T] is the prompt. One full-cache forward pass over tokens[0:T+C] gives, per
    layer, post-RoPE K and V of the prompt, the last W prompt queries (the observation
    window, W = min(64, T // 4)), H2O scores (attention each prompt key received from all
    prompt queries, per query head, [H_q, T]), and the reference continuation: queries,
    attention outputs and next-token log-probabilities at positions T..T+C-1.
  * The prompt cache goes to a safetensors file in the kvcompress input format;
    `kvc compress --local` writes the ragged compressed cache.
  * Decode: tokens[T:T+C] are fed (teacher forcing) at positions T..T+C-1; in every layer
    each KV head attends to its own kept rows (merged rows as given) plus the continuation's
    own keys causally. Score: mean log p(tokens[t+1]) over t = T..T+C-1 (nats/token). The
    prediction of tokens[T] comes from the prefill logits, which compression cannot change,
    so it is not counted.
  * Attention-output relative error, per layer, isolated from error propagation: the full
    run's continuation queries attend to the compressed prompt rows plus the full run's
    continuation keys/values; ||o_c - o_full||_F / ||o_full||_F over heads x queries x dims,
    then the mean over layers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import gguf_llama as gl

# ----------------------------------------------------------------------------------------
# safetensors (tiny reader/writer; the format is an 8-byte header length, a JSON header and
# the raw little-endian tensor bytes)

_DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "F64": np.float64,
           "I64": np.int64}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def write_safetensors(path: str, tensors: Dict[str, np.ndarray],
                      metadata: Optional[Dict[str, str]] = None) -> None:
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    blobs = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def read_safetensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
        out[name] = np.frombuffer(raw, dtype=dtype, count=(end - start) // dtype.itemsize,
                                  offset=base + start).reshape(info["shape"])
    return out, meta


# ----------------------------------------------------------------------------------------
# Methods


@dataclasses.dataclass(frozen=True)
class Method:
    label: str           # row name in the table
    args: Tuple[str, ...]  # kvc compress flags (empty for the Python baselines)
    note: str = ""
    # Flags that depend on the budget n (tokens per head), appended to `args`.
    budget_args: Optional[Callable[[int], Tuple[str, ...]]] = None

    def flags(self, n: int) -> Tuple[str, ...]:
        return self.args + (self.budget_args(n) if self.budget_args else ())


# Every method (pipeline) the engine offers. Rows of methods a build lacks read
# "not implemented" (kvc answers UNIMPLEMENTED).
METHODS: Tuple[Method, ...] = (
    Method("snapkv", ("--method", "snapkv"), "window attention, avg pool 5, group mean"),
    Method("pyramidkv", ("--method", "pyramidkv"), "snapkv + pyramid layer budget"),
    Method("dynamickv", ("--method", "dynamickv"), "snapkv + dynamic layer budget"),
    Method("adakv", ("--method", "adakv"), "snapkv + adaptive head budget"),
    Method("pyramidkv+adakv", ("--method", "snapkv", "--layer-budget", "pyramid",
                               "--head-budget", "adaptive"), "pyramid layers, adaptive heads"),
    Method("kvmerger", ("--method", "kvmerger"), "snapkv + merge_similar"),
    Method("snapkv+merge_nearest", ("--method", "snapkv", "--reducer", "merge_nearest"),
           "snapkv, evicted values folded into nearest kept key"),
    Method("observed", ("--method", "observed"),
           "observed scores = accumulated attention from all prompt queries"),
    Method("h2o", ("--method", "observed"), "observed scores + the n/2 most recent tokens "
           "(H2O's heavy hitters + recent window)",
           budget_args=lambda n: ("--protect-recent", str(n // 2))),
    Method("tova", ("--method", "tova"), "last query's attention, all heads"),
    Method("keydiff", ("--method", "keydiff"), "-cos(k, mean key direction)"),
    Method("knorm", ("--method", "knorm"), "−‖k‖₂, lowest-norm keys kept"),
    Method("streaming", ("--method", "streaming"), "4 sinks + recent"),
)
RANDOM_SEEDS = (0, 1, 2)
RANDOM = Method("random", (), "uniform random tokens per (layer, head), mean over seeds 0, 1, 2")
KEEPS = (0.5, 0.25, 0.1)


def budget(T: int, keep: float) -> int:
    """kvcompress's n = floor(T * keep + 1e-9), clamped to [1, T] (docs/methods.md)."""
    return max(1, min(T, int(np.floor(T * keep + 1e-9))))


# ----------------------------------------------------------------------------------------
# Reference (full cache)


@dataclasses.dataclass
class Reference:
    name: str
    T: int                 # prompt length (tokens, BOS included)
    C: int                 # continuation tokens fed (and scored)
    W: int                 # window queries written to the cache file
    tokens: np.ndarray     # [T + C + 1]
    k: List[np.ndarray]    # per layer [H_kv, T + C, D] post-RoPE
    v: List[np.ndarray]    # per layer [H_kv, T + C, D]
    q: List[np.ndarray]    # per layer [H_q, W + C, D]: window queries, then continuation
    attn: List[np.ndarray]  # per layer [H_q, C, D]: full-cache attention outputs
    h2o: List[np.ndarray]  # per layer [H_q, T]
    token_ll: np.ndarray   # [C] full-cache log p of tokens[T+1 : T+C+1]
    prompt_nll: float      # mean -log p over the prompt's tokens 1..T-1 (model sanity)
    seconds: float

    @property
    def ll(self) -> float:
        return float(self.token_ll.mean())


def window_size(T: int) -> int:
    return int(min(64, T // 4))


def make_reference(model: gl.LlamaModel, tokens: Sequence[int], T: int, C: int,
                   name: str = "") -> Reference:
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) < T + C + 1:
        raise ValueError(f"{name}: {len(tokens)} tokens, need T + C + 1 = {T + C + 1}")
    tokens = tokens[:T + C + 1]
    W = window_size(T)
    t0 = time.time()
    rec = gl.Forward(model).run(tokens[:T + C], record=True, h2o_rows=T)
    all_ll = gl.token_logprobs(rec["logits"], tokens[1:T + C + 1])
    return Reference(
        name=name, T=T, C=C, W=W, tokens=tokens,
        k=rec["k"], v=rec["v"],
        q=[q[:, T - W:T + C] for q in rec["q"]],
        attn=[a[:, T:T + C] for a in rec["attn"]],
        h2o=rec["h2o"],
        token_ll=all_ll[T:T + C],
        prompt_nll=float(-all_ll[:T - 1].mean()),
        seconds=time.time() - t0,
    )


def write_input_cache(ref: Reference, path: str, with_scores: bool) -> None:
    T, W = ref.T, ref.W
    tensors = {}
    for layer in range(len(ref.k)):
        tensors[f"layers.{layer}.keys"] = ref.k[layer][:, :T].astype(np.float32)
        tensors[f"layers.{layer}.values"] = ref.v[layer][:, :T].astype(np.float32)
        tensors[f"layers.{layer}.queries"] = ref.q[layer][:, :W].astype(np.float32)
        if with_scores:
            tensors[f"layers.{layer}.scores"] = ref.h2o[layer].astype(np.float32)
    write_safetensors(path, tensors)


# ----------------------------------------------------------------------------------------
# Compressed caches


@dataclasses.dataclass
class CompressedCache:
    layers: List[gl.LayerCache]
    kept_fraction: float   # sum of kept rows / (L * H_kv * T)


def read_compressed(path: str, n_layers: int, T: int) -> CompressedCache:
    tensors, _ = read_safetensors(path)
    layers = []
    total = 0
    for layer in range(n_layers):
        kept = tensors[f"layers.{layer}.kept"].astype(np.int64)
        keys = tensors[f"layers.{layer}.keys"]
        values = tensors[f"layers.{layer}.values"]
        positions = tensors[f"layers.{layer}.positions"]
        offsets = np.concatenate([[0], np.cumsum(kept)])
        if offsets[-1] != keys.shape[0]:
            raise ValueError(f"layer {layer}: sum(kept)={offsets[-1]} != rows {keys.shape[0]}")
        sl = [slice(offsets[h], offsets[h + 1]) for h in range(len(kept))]
        layers.append(gl.LayerCache([keys[s] for s in sl], [values[s] for s in sl],
                                    [positions[s] for s in sl]))
        total += int(offsets[-1])
        h_kv = len(kept)
    return CompressedCache(layers, total / (n_layers * h_kv * T))


def full_cache(ref: Reference) -> CompressedCache:
    T = ref.T
    layers = []
    for k, v in zip(ref.k, ref.v):
        layers.append(gl.LayerCache([k[h, :T] for h in range(k.shape[0])],
                                    [v[h, :T] for h in range(v.shape[0])],
                                    [np.arange(T) for _ in range(k.shape[0])]))
    return CompressedCache(layers, 1.0)


def random_cache(ref: Reference, keep: float, seed: int = 0) -> CompressedCache:
    """Uniform random tokens per (layer, head) at the same budget n, fixed seed."""
    rng = np.random.default_rng(seed)
    T = ref.T
    n = budget(T, keep)
    layers = []
    for k, v in zip(ref.k, ref.v):
        keys, values, positions = [], [], []
        for h in range(k.shape[0]):
            idx = np.sort(rng.choice(T, size=n, replace=False))
            keys.append(k[h, idx])
            values.append(v[h, idx])
            positions.append(idx)
        layers.append(gl.LayerCache(keys, values, positions))
    return CompressedCache(layers, n / T)


class Unimplemented(Exception):
    pass


def run_kvc(kvc: str, inp: str, out: str, method: Method, keep: float, T: int,
            threads: Optional[int] = None) -> None:
    cmd = [kvc, "compress", "--local", "--input", inp, "--output", out,
           *method.flags(budget(T, keep)), "--keep", repr(keep)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        message = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        message = message[-1] if message else f"exit {proc.returncode}"
        if "UNIMPLEMENTED" in message:
            raise Unimplemented(message)
        raise RuntimeError(f"{' '.join(cmd)}: {message}")


# ----------------------------------------------------------------------------------------
# Scoring a compressed cache


@dataclasses.dataclass
class Score:
    ll: float               # mean log-likelihood of the continuation, nats/token
    delta: float            # ll - full-cache ll
    attn_err: float         # mean over layers of the isolated attention-output relative error
    attn_err_layers: List[float]
    kept_fraction: float


def score_cache(model: gl.LlamaModel, ref: Reference, cache: CompressedCache) -> Score:
    T, C, W = ref.T, ref.C, ref.W
    rec = gl.Forward(model).run(ref.tokens[T:T + C], start=T, prefix=cache.layers)
    token_ll = gl.token_logprobs(rec["logits"], ref.tokens[T + 1:T + C + 1])
    errs = []
    for layer, lc in enumerate(cache.layers):
        q = ref.q[layer][:, W:]
        o = gl.ragged_attention(q, ref.k[layer][:, T:T + C], ref.v[layer][:, T:T + C], lc)
        full = ref.attn[layer].astype(np.float64)
        errs.append(float(np.linalg.norm(o.astype(np.float64) - full) / np.linalg.norm(full)))
    ll = float(token_ll.mean())
    return Score(ll, ll - ref.ll, float(np.mean(errs)), errs, cache.kept_fraction)


def masked_forward_ll(model: gl.LlamaModel, ref: Reference, cache: CompressedCache) -> float:
    """The continuation's mean log-likelihood computed another way: one forward pass over
    the whole sequence in which continuation queries of KV head h may not see the prompt
    tokens head h evicted. Equals score_cache(...).ll for eviction (drop) methods; checks the
    ragged decode path independently."""
    T, C = ref.T, ref.C
    n = T + C
    causal = np.tril(np.ones((n, n), dtype=bool))
    masks = []
    for lc in cache.layers:
        m = np.repeat(causal[None], len(lc.positions), axis=0)
        for h, pos in enumerate(lc.positions):
            visible = np.zeros(T, dtype=bool)
            visible[pos] = True
            m[h, T:, :T] = visible[None, :]
        masks.append(m)
    rec = gl.Forward(model).run(ref.tokens[:n], masks=masks, logits_from=T)
    return float(gl.token_logprobs(rec["logits"], ref.tokens[T + 1:n + 1]).mean())


class Evaluator:
    """Evaluates methods on one reference: writes the input caches once, then compresses."""

    def __init__(self, model: gl.LlamaModel, ref: Reference, kvc: str,
                 workdir: Optional[str] = None, threads: Optional[int] = None):
        self.model, self.ref, self.kvc, self.threads = model, ref, kvc, threads
        self._tmp = tempfile.TemporaryDirectory(prefix="kvq-", dir=workdir)
        self.dir = self._tmp.name
        self.input = os.path.join(self.dir, "input.safetensors")
        self.input_scores = os.path.join(self.dir, "input_scores.safetensors")
        write_input_cache(ref, self.input, with_scores=False)
        write_input_cache(ref, self.input_scores, with_scores=True)

    def close(self):
        self._tmp.cleanup()

    def compressed(self, method: Method, keep: float) -> CompressedCache:
        if method is RANDOM:
            return random_cache(self.ref, keep)
        out = os.path.join(self.dir, "output.safetensors")
        inp = self.input_scores if "observed" in method.args else self.input
        run_kvc(self.kvc, inp, out, method, keep, self.ref.T, self.threads)
        try:
            return read_compressed(out, len(self.ref.k), self.ref.T)
        finally:
            os.remove(out)

    def evaluate(self, method: Method, keep: float) -> Score:
        if method is RANDOM:  # one seed is a noisy baseline: average a few
            scores = [score_cache(self.model, self.ref, random_cache(self.ref, keep, seed))
                      for seed in RANDOM_SEEDS]
            return Score(*(float(np.mean([getattr(s, f) for s in scores]))
                           for f in ("ll", "delta", "attn_err")),
                         list(np.mean([s.attn_err_layers for s in scores], axis=0)),
                         scores[0].kept_fraction)
        return score_cache(self.model, self.ref, self.compressed(method, keep))


def find_kvc(explicit: Optional[str] = None) -> str:
    """`explicit`, else $KVC_BIN_DIR/kvc, else build/bin/kvc (the default preset), else the
    newest build*/bin/kvc of the repository."""
    if explicit:
        return explicit
    if os.environ.get("KVC_BIN_DIR"):
        return os.path.join(os.environ["KVC_BIN_DIR"], "kvc")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    default = os.path.join(root, "build", "bin", "kvc")
    if os.access(default, os.X_OK):
        return default
    found = []
    for entry in os.listdir(root):
        path = os.path.join(root, entry, "bin", "kvc")
        if entry.startswith("build") and os.access(path, os.X_OK):
            found.append((os.path.getmtime(path), path))
    if not found:
        raise FileNotFoundError("no kvc binary: build it or set KVC_BIN_DIR")
    return max(found)[1]
