"""A small numpy Llama: GGUF weights, the GGUF's own tokenizer, and a forward pass that
exposes what a KV-cache compressor sees (post-RoPE keys, values, window queries, H2O scores).

Conventions, checked against the GGUF files we use (see tests/quality/README.md):
  * Weights are read with the PyPI `gguf` package; quantized tensors (SmolLM2's Q4_1 / Q8_0)
    are dequantized with `gguf.quants.dequantize`. A GGUF matrix of shape (n_out, n_in)
    acts as y = x @ W.T.
  * RoPE is llama.cpp's "normal" mode: rotation of adjacent pairs (2i, 2i+1) with
    frequency theta^(-2i/D). llama2.c (stories260K) trains with exactly this; HF Llama
    checkpoints (SmolLM2) are converted to GGUF with q/k rows permuted so that the same
    interleaved rotation applies. theta = `llama.rope.freq_base` (default 10000).
  * A model without `output.weight` ties the output projection to `token_embd.weight`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional

import numpy as np


# ----------------------------------------------------------------------------------------
# GGUF reading


def _field_value(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _string_array(reader, key) -> List[str]:
    field = reader.fields[key]
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


def _scalar_array(reader, key) -> np.ndarray:
    field = reader.fields[key]
    return np.array([field.parts[i][0] for i in field.data])


@dataclasses.dataclass
class LlamaConfig:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float
    rope_dim: int
    norm_eps: float
    context_length: int
    vocab_size: int


class LlamaModel:
    """Weights (dequantized to `dtype`), config and tokenizer of a GGUF Llama."""

    def __init__(self, path: str, dtype=np.float32):
        import gguf  # PyPI package; imported here so the module loads without it
        from gguf import quants

        reader = gguf.GGUFReader(path)
        arch = _field_value(reader, "general.architecture")
        if arch != "llama":
            raise ValueError(f"{path}: architecture {arch!r}, expected 'llama'")
        p = "llama."
        d_model = int(_field_value(reader, p + "embedding_length"))
        n_heads = int(_field_value(reader, p + "attention.head_count"))
        n_kv = int(_field_value(reader, p + "attention.head_count_kv", n_heads))
        head_dim = d_model // n_heads
        self.tensors: Dict[str, np.ndarray] = {}
        for t in reader.tensors:
            if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                a = np.asarray(t.data).reshape([int(x) for x in reversed(t.shape)])
            else:
                a = quants.dequantize(t.data, t.tensor_type)
            self.tensors[t.name] = np.ascontiguousarray(a, dtype=dtype)
        vocab = int(self.tensors["token_embd.weight"].shape[0])
        self.config = LlamaConfig(
            name=str(_field_value(reader, "general.name", path)),
            n_layers=int(_field_value(reader, p + "block_count")),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            d_ff=int(_field_value(reader, p + "feed_forward_length")),
            rope_theta=float(_field_value(reader, p + "rope.freq_base", 10000.0)),
            rope_dim=int(_field_value(reader, p + "rope.dimension_count", head_dim)),
            norm_eps=float(_field_value(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
            context_length=int(_field_value(reader, p + "context_length", 2048)),
            vocab_size=vocab,
        )
        if self.config.rope_dim != head_dim:
            raise ValueError(f"partial RoPE ({self.config.rope_dim} of {head_dim}) not supported")
        if "output.weight" not in self.tensors:  # tied embeddings (SmolLM2)
            self.tensors["output.weight"] = self.tensors["token_embd.weight"]
        self.dtype = dtype
        self.tokenizer = make_tokenizer(reader)

    def w(self, name: str) -> np.ndarray:
        return self.tensors[name]


# ----------------------------------------------------------------------------------------
# Tokenizers built from the GGUF tokenizer fields


def make_tokenizer(reader):
    kind = _field_value(reader, "tokenizer.ggml.model")
    tokens = _string_array(reader, "tokenizer.ggml.tokens")
    bos = _field_value(reader, "tokenizer.ggml.bos_token_id")
    eos = _field_value(reader, "tokenizer.ggml.eos_token_id")
    if kind == "llama":
        scores = _scalar_array(reader, "tokenizer.ggml.scores").astype(np.float64)
        types = _scalar_array(reader, "tokenizer.ggml.token_type").astype(int)
        add_bos = _field_value(reader, "tokenizer.ggml.add_bos_token", True)
        return SpmTokenizer(tokens, scores, types, bos, eos, bool(add_bos))
    if kind == "gpt2":
        merges = _string_array(reader, "tokenizer.ggml.merges")
        add_bos = _field_value(reader, "tokenizer.ggml.add_bos_token", False)
        pre = _field_value(reader, "tokenizer.ggml.pre", "default")
        return Gpt2BpeTokenizer(tokens, merges, bos, eos, bool(add_bos), pre)
    raise ValueError(f"tokenizer model {kind!r} not supported")


class SpmTokenizer:
    """SentencePiece-style tokenizer as llama.cpp runs it for `tokenizer.ggml.model = llama`:
    a dummy-space prefix, spaces as '▁', characters as initial symbols (unknown ones fall
    back to <0xXX> byte tokens), then repeatedly merge the adjacent pair whose concatenation
    is a vocabulary piece with the highest score (leftmost on ties)."""

    def __init__(self, tokens, scores, types, bos, eos, add_bos):
        self.tokens = tokens
        self.scores = scores
        self.index = {t: i for i, t in enumerate(tokens) if types[i] in (1, 4)}  # normal, user
        self.byte_token = {}
        for i, t in enumerate(tokens):
            if types[i] == 6 and len(t) == 6 and t.startswith("<0x"):
                self.byte_token[int(t[3:5], 16)] = i
        self.types = types
        self.bos, self.eos, self.add_bos = bos, eos, add_bos

    def encode(self, text: str, bos: Optional[bool] = None) -> List[int]:
        text = "▁" + text.replace(" ", "▁")
        symbols = list(text)
        while len(symbols) > 1:
            best, best_i = None, -1
            for i in range(len(symbols) - 1):
                piece = symbols[i] + symbols[i + 1]
                tid = self.index.get(piece)
                if tid is not None and (best is None or self.scores[tid] > best):
                    best, best_i = self.scores[tid], i
            if best_i < 0:
                break
            symbols[best_i : best_i + 2] = [symbols[best_i] + symbols[best_i + 1]]
        ids = [self.bos] if (self.add_bos if bos is None else bos) else []
        for s in symbols:
            tid = self.index.get(s)
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(self.byte_token[b] for b in s.encode("utf-8"))
        return ids

    def decode(self, ids) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if self.types[i] == 6:
                out.append(int(self.tokens[i][3:5], 16))
            elif self.types[i] in (1, 4):
                out.extend(self.tokens[i].replace("▁", " ").encode("utf-8"))
        text = out.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text


def _bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Gpt2BpeTokenizer:
    """Byte-level BPE (`tokenizer.ggml.model = gpt2`) with the GGUF's merge ranks.

    Pre-tokenization follows llama.cpp's regexes for `pre = smollm` (digits split one by one,
    then the GPT-2 pattern). Python's `re` has no \\p{L}; `[^\\W\\d_]` (letters) and
    `[^\\s\\w]|_` (neither letter, digit nor space) stand in for it, which is exact for
    ASCII text like ours."""

    _PATTERN = re.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
    )

    def __init__(self, tokens, merges, bos, eos, add_bos, pre):
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}
        self.ranks = {}
        for rank, m in enumerate(merges):
            a, b = m.split(" ", 1)
            self.ranks[(a, b)] = rank
        self.bos, self.eos, self.add_bos, self.pre = bos, eos, add_bos, pre
        self.b2u = _bytes_to_unicode()
        self.u2b = {c: b for b, c in self.b2u.items()}
        self._cache: Dict[str, List[str]] = {}

    def _bpe(self, word: str) -> List[str]:
        if word in self._cache:
            return self._cache[word]
        parts = list(word)
        while len(parts) > 1:
            best, best_i = None, -1
            for i in range(len(parts) - 1):
                r = self.ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best is None or r < best):
                    best, best_i = r, i
            if best_i < 0:
                break
            parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        self._cache[word] = parts
        return parts

    def encode(self, text: str, bos: Optional[bool] = None) -> List[int]:
        ids = [self.bos] if (self.add_bos if bos is None else bos) else []
        for chunk in self._PATTERN.findall(text):
            mapped = "".join(self.b2u[b] for b in chunk.encode("utf-8"))
            ids.extend(self.index[p] for p in self._bpe(mapped))
        return ids

    def decode(self, ids) -> str:
        data = bytearray()
        for i in ids:
            tok = self.tokens[int(i)]
            if tok.startswith("<|") and tok.endswith("|>"):
                continue
            data.extend(self.u2b[c] for c in tok)
        return data.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------
# Forward pass


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps)).astype(x.dtype) * weight


def rope_tables(positions: np.ndarray, head_dim: int, theta: float):
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = positions.astype(np.float64)[:, None] * inv[None, :]  # [N, D/2]
    return np.cos(angles), np.sin(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray,
               mode: str = "normal") -> np.ndarray:
    """x [H, N, D]. mode "normal" (llama.cpp's, the GGUF convention): rotates adjacent pairs
    (x[2i], x[2i+1]). mode "neox" rotates (x[i], x[i + D/2]) (HF rotate_half); offered only
    to show that it is the wrong convention for these files (a much worse perplexity)."""
    d = x.shape[-1]
    if mode == "normal":
        i0, i1 = slice(0, d, 2), slice(1, d, 2)
    elif mode == "neox":
        i0, i1 = slice(0, d // 2), slice(d // 2, d)
    else:
        raise ValueError(mode)
    x0 = x[..., i0].astype(np.float64)
    x1 = x[..., i1].astype(np.float64)
    out = np.empty(x.shape, dtype=np.float64)
    out[..., i0] = x0 * cos - x1 * sin
    out[..., i1] = x0 * sin + x1 * cos
    return out.astype(x.dtype)


def softmax(x: np.ndarray, axis=-1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(x: np.ndarray, axis=-1) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def token_logprobs(logits: np.ndarray, targets: np.ndarray, chunk: int = 256) -> np.ndarray:
    """log softmax(logits)[i, targets[i]] in float64, in row chunks (SmolLM2's vocabulary
    is 49152 wide)."""
    out = np.empty(len(targets), dtype=np.float64)
    for s in range(0, len(targets), chunk):
        lp = log_softmax(logits[s:s + chunk])
        out[s:s + chunk] = lp[np.arange(lp.shape[0]), targets[s:s + chunk]]
    return out


class LayerCache:
    """The cache one layer's attention sees for KV head h: rows keys[h], values[h] (any
    count per head: ragged), at original positions positions[h]."""

    def __init__(self, keys: List[np.ndarray], values: List[np.ndarray],
                 positions: List[np.ndarray]):
        self.keys, self.values, self.positions = keys, values, positions


def gqa_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Optional[np.ndarray],
                  want_probs: bool = False):
    """q [H_q, N, D], k/v [H_kv, M, D], mask [N, M] or per KV head [H_kv, N, M], bool
    (True = attend), or None. Returns out [H_q, N, D] (and probs [H_q, N, M])."""
    h_q, n, d = q.shape
    h_kv = k.shape[0]
    g = h_q // h_kv
    qg = q.reshape(h_kv, g * n, d)
    logits = np.matmul(qg, np.swapaxes(k, 1, 2)) / np.sqrt(d)  # [H_kv, G*N, M]
    logits = logits.reshape(h_kv, g, n, -1)
    if mask is not None:
        mask = mask[None, None] if mask.ndim == 2 else mask[:, None]
        logits = np.where(mask, logits, -np.inf)
    probs = softmax(logits, axis=-1)
    out = np.matmul(probs.reshape(h_kv, g * n, -1), v).reshape(h_q, n, d)
    if want_probs:
        return out, probs.reshape(h_q, n, -1)
    return out, None


class Forward:
    """Runs the model on a token sequence.

    `run(tokens, start, prefix)`: tokens at positions start..start+N-1. `prefix` is an
    optional list (per layer) of LayerCache: rows that every new token attends to (the
    compressed cache), in addition to the new tokens themselves (causally). Records per
    layer q, k, v (post-RoPE, [H, N, D]) and attention outputs ([H_q, N, D]) when asked.
    """

    def __init__(self, model: LlamaModel, rope_mode: str = "normal"):
        self.m = model
        self.c = model.config
        self.rope_mode = rope_mode

    def embed(self, tokens):
        return self.m.w("token_embd.weight")[np.asarray(tokens)]

    def run(self, tokens, start: int = 0, prefix: Optional[List[LayerCache]] = None,
            record: bool = False, h2o_rows: int = 0, logits_from: int = 0,
            masks: Optional[List[np.ndarray]] = None):
        """Returns dict: logits [N - logits_from, V] (float32), and when `record`,
        lists per layer of q, k, v, attn (post-RoPE; attn = attention output before
        o-proj); when h2o_rows > 0, h2o [H_q, h2o_rows] per layer: the attention each of
        the first h2o_rows keys received from the first h2o_rows queries, summed.
        `masks` (no prefix): per layer [H_kv, N, N] bool masks replacing the causal one
        (an independent way to express eviction, used to check the ragged path)."""
        c, m = self.c, self.m
        n = len(tokens)
        pos = np.arange(start, start + n)
        cos, sin = rope_tables(pos, c.head_dim, c.rope_theta)
        causal = np.tril(np.ones((n, n), dtype=bool))
        x = self.embed(tokens).astype(m.dtype)
        rec = {"q": [], "k": [], "v": [], "attn": [], "h2o": []}
        for layer in range(c.n_layers):
            b = f"blk.{layer}."
            h = rms_norm(x, m.w(b + "attn_norm.weight"), c.norm_eps)
            q = (h @ m.w(b + "attn_q.weight").T).reshape(n, c.n_heads, c.head_dim)
            k = (h @ m.w(b + "attn_k.weight").T).reshape(n, c.n_kv_heads, c.head_dim)
            v = (h @ m.w(b + "attn_v.weight").T).reshape(n, c.n_kv_heads, c.head_dim)
            mode = self.rope_mode
            q = apply_rope(np.ascontiguousarray(q.transpose(1, 0, 2)), cos, sin, mode)
            k = apply_rope(np.ascontiguousarray(k.transpose(1, 0, 2)), cos, sin, mode)
            v = np.ascontiguousarray(v.transpose(1, 0, 2))
            if prefix is None:
                mask = causal if masks is None else masks[layer]
                attn, probs = gqa_attention(q, k, v, mask, want_probs=h2o_rows > 0)
                if h2o_rows > 0:
                    rec["h2o"].append(
                        probs[:, :h2o_rows, :h2o_rows].sum(axis=1, dtype=np.float64)
                        .astype(np.float32))
            else:
                attn = ragged_attention(q, k, v, prefix[layer])
            if record:
                rec["q"].append(q)
                rec["k"].append(k)
                rec["v"].append(v)
                rec["attn"].append(attn)
            o = attn.transpose(1, 0, 2).reshape(n, c.n_heads * c.head_dim)
            x = x + o @ m.w(b + "attn_output.weight").T
            h = rms_norm(x, m.w(b + "ffn_norm.weight"), c.norm_eps)
            gate = h @ m.w(b + "ffn_gate.weight").T
            up = h @ m.w(b + "ffn_up.weight").T
            act = gate / (1.0 + np.exp(-gate.astype(np.float64))).astype(gate.dtype) * up
            x = x + act @ m.w(b + "ffn_down.weight").T
        x = rms_norm(x[logits_from:], m.w("output_norm.weight"), c.norm_eps)
        rec["logits"] = x @ m.w("output.weight").T
        return rec


def ragged_attention(q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray,
                     cache: LayerCache) -> np.ndarray:
    """New tokens' queries q [H_q, N, D] attend, per KV head h, to the cache rows of head h
    (whatever their number) plus the new tokens' own keys/values k_new/v_new [H_kv, N, D]
    causally. Merged rows are used as given."""
    h_q, n, d = q.shape
    h_kv = k_new.shape[0]
    g = h_q // h_kv
    out = np.empty_like(q)
    causal = np.tril(np.ones((n, n), dtype=bool))
    for h in range(h_kv):
        kc, vc = cache.keys[h], cache.values[h]
        keys = np.concatenate([kc.astype(q.dtype), k_new[h]], axis=0)
        vals = np.concatenate([vc.astype(q.dtype), v_new[h]], axis=0)
        mask = np.concatenate([np.ones((n, kc.shape[0]), dtype=bool), causal], axis=1)
        o, _ = gqa_attention(q[h * g:(h + 1) * g], keys[None], vals[None], mask)
        out[h * g:(h + 1) * g] = o
    return out
