#!/usr/bin/env python3
"""Compress a Hugging Face `transformers` model's KV cache through kvcd, then generate from it.

    kvcd --address=localhost:50051 &
    python client/python/examples/hf_generate.py --server localhost:50051 \
        --model HuggingFaceTB/SmolLM2-135M-Instruct --method snapkv --keep 0.5
    python client/python/examples/hf_generate.py --model ../shared/models/stories260K.gguf

What it does (batch of one sequence, Llama-style models with full attention in every layer):

 1. Prefill the prompt in one forward pass. The model runs with the attention function
    `kvc_eager` registered below; during prefill it hands each layer's post-RoPE keys,
    values and last W post-RoPE queries to a kvcompress Stream as soon as that layer has run,
    so kvcd compresses layer l while the model computes layer l+1 (compression overlaps
    prefill). A reader thread collects the per-layer results.
 2. kvcd returns, per layer, a truly ragged cache: head h keeps kept[h] rows (AdaKV and
    PyramidKV make the counts differ between heads and layers) and their original positions.
 3. The decode cache pads every head to the layer's largest count (zero rows) and records a
    per-(layer, KV head) validity mask over the padded slots. The keys were rotated at their
    original positions and are kept as they are; new tokens continue at positions T, T+1, ...
    (passed as `position_ids`: the cache length is no longer the position).
 4. Greedy decoding from the compressed cache and from the full cache, with the same
    attention function; it prints the kept fraction, both continuations and how far they
    agree, and checks the compressed cache against the full cache with the dropped positions
    masked out per head (the same logits, up to float rounding, for dropping methods).

Why a registered attention function rather than an attention mask: transformers' masks are
per batch row ([B, 1, N, S]) and sized from one layer of the cache, while here every
(layer, KV head) has its own set of valid slots and every layer may have its own length.
`AttentionInterface.register` is the public hook for this in transformers 5 (pinned
transformers==5.2.0): the attention module calls it with post-RoPE queries and the keys and
values after the cache update, and extra keyword arguments given to the model's forward reach
it unchanged. Because no mask function is registered under the same name, transformers skips
building a mask for it (masking_utils: custom attention without an equivalent mask function
gets `attention_mask=None`), so the function owns the whole mask: causal among the tokens of
this forward call plus the per-head validity of the slots cached before it. Everything else
(projections, RoPE, MLP, norms, the cache) is the model's own code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading
import time
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

import kvcompress as kc

KVC_ATTENTION = "kvc_eager"

# ------------------------------------------------------------------------------------------
# Attention


def head_mask(prefix_valid: Optional[torch.Tensor], num_queries: int, num_keys: int,
              group: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive mask [1, H_q or 1, N, S] for N queries that are the last N of S key slots.

    Slots before the last N were cached before this call: slot j is visible to KV head h
    iff prefix_valid[h, j] (True beyond prefix_valid's width: tokens generated since the
    cache was built). The last N slots are this call's tokens: causal."""
    n, s = num_queries, num_keys
    past = s - n
    q_idx = torch.arange(n, device=device)[:, None]
    k_idx = torch.arange(s, device=device)[None, :]
    allowed = (k_idx < past) | (k_idx - past <= q_idx)  # [N, S]
    if prefix_valid is not None:
        h_kv, m = prefix_valid.shape
        if m > past:
            raise ValueError(f"prefix mask covers {m} slots, the cache holds {past}")
        slots = torch.ones((h_kv, s), dtype=torch.bool, device=device)
        slots[:, :m] = prefix_valid.to(device)
        slots = slots.repeat_interleave(group, dim=0)  # query head i uses KV head i // group
        allowed = allowed[None] & slots[:, None, :]  # [H_q, N, S]
    else:
        allowed = allowed[None]
    zero = torch.zeros((), dtype=dtype, device=device)
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.where(allowed, zero, neg)[None]


def kvc_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0,
                        kvc_capture: Optional[Callable] = None,
                        kvc_prefix_valid: Optional[Sequence[torch.Tensor]] = None, **kwargs):
    """Eager attention with a per-(layer, KV head) mask over the cached slots.

    query [B, H_q, N, D] (post-RoPE), key/value [B, H_kv, S, D] (the cache after this call's
    update). kvc_capture(layer, query, key, value) is called first when given (prefill).
    kvc_prefix_valid[layer] is a bool [H_kv, M]: which of the first M cached slots each KV
    head may attend to. The `attention_mask` transformers passes (None for this registered
    name) is not used: the mask is rebuilt from shapes, which assumes one unpadded sequence."""
    if query.shape[0] != 1:
        raise ValueError("kvc_eager_attention handles one sequence (batch size 1)")
    layer = module.layer_idx
    if kvc_capture is not None:
        kvc_capture(layer, query, key, value)
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    weights = torch.matmul(query, k.transpose(2, 3)) * scaling
    valid = None if kvc_prefix_valid is None else kvc_prefix_valid[layer]
    weights = weights + head_mask(valid, query.shape[2], key.shape[2], group, weights.dtype,
                                  weights.device)
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, v).transpose(1, 2).contiguous()  # [B, N, H_q, D]
    return out, weights


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(KVC_ATTENTION, kvc_eager_attention)


# ------------------------------------------------------------------------------------------
# Model


def load_model(model: str, gguf_file: Optional[str] = None, dtype: str = "fp32",
               device: str = "cpu"):
    """(model, tokenizer). `model` is a Hub id, a local directory or a .gguf file (transformers
    reads GGUF with the `gguf` package, dequantizing to `dtype`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if gguf_file is None and model.endswith(".gguf") and os.path.isfile(model):
        model, gguf_file = os.path.split(os.path.abspath(model))
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(model, **extra)
    # Some GGUF files (stories260K's) store "no padding token" as 0xFFFFFFFF, which
    # nn.Embedding rejects as padding_idx.
    if config.pad_token_id is not None and not 0 <= config.pad_token_id < config.vocab_size:
        config.pad_token_id = None
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) or any(t != "full_attention" for t in layer_types):
        raise ValueError(f"{model}: sliding-window layers are not handled by this example")
    register_attention()
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    tokenizer = AutoTokenizer.from_pretrained(model, **extra)
    lm = AutoModelForCausalLM.from_pretrained(model, config=config, dtype=torch_dtype,
                                              attn_implementation=KVC_ATTENTION, **extra)
    return lm.to(device).eval(), tokenizer


def geometry(model):
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return (c.num_hidden_layers, c.num_key_value_heads or c.num_attention_heads,
            c.num_attention_heads, head_dim)


# ------------------------------------------------------------------------------------------
# Prefill + compression


@dataclasses.dataclass
class Prefill:
    num_tokens: int
    last_logits: torch.Tensor  # [V], the prediction of the first new token
    cache: object  # transformers DynamicCache of the whole prompt
    layers: List[kc.LayerOutput]  # kvcd's ragged result per layer
    summary: object  # kvcompress.v1.CompressSummary
    prefill_seconds: float


_WIRE_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def prefill_and_compress(model, input_ids: torch.Tensor, client: kc.Client, method: kc.Method,
                         keep_ratio: Optional[float] = None, keep_tokens: Optional[int] = None,
                         timeout: Optional[float] = None) -> Prefill:
    """One prefill forward pass whose layers stream to kvcd as they are computed."""
    num_layers, h_kv, h_q, head_dim = geometry(model)
    t = int(input_ids.shape[-1])
    window = min(method.window, t)  # snapkv reads its last `window` queries; tova the last one
    stream = client.stream(num_layers=num_layers, num_kv_heads=h_kv, num_query_heads=h_q,
                           head_dim=head_dim, dtype=_WIRE_DTYPES[model.dtype], num_tokens=t,
                           method=method, keep_ratio=keep_ratio, keep_tokens=keep_tokens,
                           num_window_queries=window, timeout=timeout)
    results: dict = {}
    failure: List[BaseException] = []

    def read() -> None:  # results arrive while later layers are still being computed
        try:
            for out in stream.results():
                results[out.layer] = out
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)

    def capture(layer: int, query, key, value) -> None:
        if failure:  # the call failed (deadline, server error): stop the prefill with its error
            raise failure[0]
        # key/value: [1, H_kv, T, D] post-RoPE (the cache after this layer's update);
        # query: [1, H_q, T, D] post-RoPE; the last `window` rows are the observation window.
        queries = query[0, :, t - window:] if window else None
        stream.send_layer(layer, key[0], value[0], queries)

    reader = threading.Thread(target=read, daemon=True)
    with stream:
        reader.start()
        start = time.perf_counter()
        try:
            with torch.no_grad():
                out = model(input_ids=input_ids, use_cache=True, kvc_capture=capture)
        except kc.KvcError:
            reader.join()
            if failure:  # the reader saw the call's own error first; report that one
                raise failure[0] from None
            raise
        elapsed = time.perf_counter() - start
        reader.join()
        if failure:
            raise failure[0]
    return Prefill(t, out.logits[0, -1].float(), out.past_key_values,
                   [results[layer] for layer in range(num_layers)], stream.summary, elapsed)


# ------------------------------------------------------------------------------------------
# Decode caches


def _to_torch(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:  # the SDK returns bf16 as uint16 bit patterns
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy()).to(dtype)


@dataclasses.dataclass
class DecodeCache:
    cache: object  # DynamicCache with [1, H_kv, M_l, D] per layer (M_l: layer l's max kept)
    prefix_valid: List[torch.Tensor]  # bool [H_kv, M_l]: slot holds a kept row of that head
    positions: List[torch.Tensor]  # int [H_kv, M_l]: original position of each slot, -1 padding
    next_position: int  # RoPE position of the next token: T


def compressed_cache(model, layers: Sequence[kc.LayerOutput], num_tokens: int) -> DecodeCache:
    """Pads kvcd's ragged per-head rows to the layer's largest count and masks the padding.
    (kvcd can also pad on the server: `padded=True` gives [H_kv, max_kept, D] with positions
    −1 in the padding; the ragged form is what a paged engine would copy into its pages.)"""
    from transformers import DynamicCache

    device, dtype = model.device, model.dtype
    cache = DynamicCache(config=model.config)
    valid, positions = [], []
    for layer, out in enumerate(layers):
        kept = out.kept.astype(np.int64)
        h_kv, d = len(kept), out.keys.shape[-1]
        width = int(kept.max())
        head = np.repeat(np.arange(h_kv), kept)  # ragged row r belongs to head[r] ...
        slot = np.arange(int(kept.sum())) - np.repeat(out.offsets[:-1], kept)  # ... slot[r]
        k = torch.zeros((h_kv, width, d), dtype=dtype)
        v = torch.zeros((h_kv, width, d), dtype=dtype)
        k[head, slot] = _to_torch(out.keys, dtype)
        v[head, slot] = _to_torch(out.values, dtype)
        pos = torch.full((h_kv, width), -1, dtype=torch.int64)
        pos[head, slot] = torch.from_numpy(out.positions.astype(np.int64))
        cache.update(k[None].to(device), v[None].to(device), layer)
        valid.append((pos >= 0).to(device))
        positions.append(pos)
    return DecodeCache(cache, valid, positions, num_tokens)


def masked_full_cache(model, prefill_cache, layers: Sequence[kc.LayerOutput],
                      num_tokens: int) -> DecodeCache:
    """The reference: the full prompt cache, with every position a head dropped masked out.
    For dropping methods it must give the compressed cache's logits (merged rows differ)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    valid, positions = [], []
    for layer, out in enumerate(layers):
        keys, values = prefill_cache.layers[layer].keys, prefill_cache.layers[layer].values
        h_kv = keys.shape[1]
        keep = torch.zeros((h_kv, num_tokens), dtype=torch.bool)
        for h in range(h_kv):
            keep[h, torch.from_numpy(out.head_positions(h).astype(np.int64))] = True
        cache.update(keys[:, :, :num_tokens].clone(), values[:, :, :num_tokens].clone(), layer)
        valid.append(keep.to(model.device))
        positions.append(torch.where(keep, torch.arange(num_tokens), -1))
    return DecodeCache(cache, valid, positions, num_tokens)


def full_cache(model, prefill_cache, num_tokens: int) -> DecodeCache:
    """The uncompressed prompt cache (a copy: decoding appends to it)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer in range(len(prefill_cache.layers)):
        cache.update(prefill_cache.layers[layer].keys[:, :, :num_tokens].clone(),
                     prefill_cache.layers[layer].values[:, :, :num_tokens].clone(), layer)
    return DecodeCache(cache, None, None, num_tokens)


# ------------------------------------------------------------------------------------------
# Decoding


def forward_tokens(model, dc: DecodeCache, tokens: Sequence[int]) -> torch.Tensor:
    """Feeds tokens at positions next_position, ... (appending them to the cache); returns
    their logits [N, V] (fp32). Several tokens at once are teacher forcing."""
    n = len(tokens)
    positions = torch.arange(dc.next_position, dc.next_position + n, device=model.device)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(tokens)], device=model.device),
                    past_key_values=dc.cache, use_cache=True, position_ids=positions[None],
                    cache_position=positions, kvc_prefix_valid=dc.prefix_valid)
    dc.next_position += n
    return out.logits[0].float()


def greedy(model, dc: DecodeCache, first_token: int, steps: int):
    """Greedy continuation of `steps` tokens, the first given (it comes from the prefill
    logits, which compression cannot change). Returns (tokens, logits [steps - 1, V])."""
    tokens, logits = [first_token], []
    for _ in range(steps - 1):
        step = forward_tokens(model, dc, [tokens[-1]])[-1]
        logits.append(step)
        tokens.append(int(step.argmax()))
    return tokens, (torch.stack(logits) if logits else torch.empty(0))


# ------------------------------------------------------------------------------------------
# Command line

METHODS = {
    "snapkv": lambda w: kc.Method.snapkv(window=w),
    "adakv": lambda w: kc.Method.snapkv(window=w, head_budget=kc.HeadBudget.adaptive()),
    "pyramidkv": lambda w: kc.Method.snapkv(window=w, layer_budget=kc.LayerBudget.pyramid()),
    "knorm": lambda w: kc.Method.knorm(),
    "streaming": lambda w: kc.Method.streaming(),
    "tova": lambda w: kc.Method.tova(),
    "keydiff": lambda w: kc.Method.keydiff(),
    "kvmerger": lambda w: kc.Method.snapkv(window=w, reducer=kc.Reducer.merge_similar()),
}

DEFAULT_PROMPT = (
    "Once upon a time, there was a little girl named Lily. She lived in a small house near "
    "the woods with her mom, her dad and her dog Max. Every morning Lily and Max walked to "
    "the big pond to look at the ducks. One day, Lily saw a tiny duck that was all alone. "
    "It was sad because it could not find its mom. Lily wanted to help the little duck. She "
    "looked behind the tall grass and under the old tree, but the mom duck was not there. "
    "Then Max started to bark and run to the other side of the pond. Lily ran after him and "
    "saw the mom duck sitting in her nest. Lily picked up the tiny duck very gently and "
    "brought it to its mom. The mom duck was so happy. Lily smiled and said, \"Now you are "
    "not alone anymore.\" When Lily got home, she told her mom about the duck. Her mom "
    "hugged her and said she was very kind. The next day,")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="localhost:50051", help="kvcd address")
    p.add_argument("--model", default=os.path.normpath(os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "..", "shared", "models",
        "stories260K.gguf")), help="Hub id, local directory or .gguf file (default: the "
        "repository's ../shared/models/stories260K.gguf)")
    p.add_argument("--gguf-file", help="GGUF file name inside --model (a directory or Hub id)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--max-prompt-tokens", type=int, help="cut the prompt to its first N tokens")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--method", choices=sorted(METHODS), default="snapkv")
    p.add_argument("--keep", type=float, default=0.5, help="keep ratio (kept tokens / T)")
    p.add_argument("--keep-tokens", type=int, help="absolute budget per head instead of --keep")
    p.add_argument("--window", type=int, default=64, help="snapkv observation window W")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="deadline of the Compress call (it spans the prefill), seconds")
    args = p.parse_args(argv)

    model, tokenizer = load_model(args.model, args.gguf_file, args.dtype, args.device)
    prompt = open(args.prompt_file).read() if args.prompt_file else args.prompt
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"][:, :args.max_prompt_tokens]
    input_ids = input_ids.to(model.device)
    method = METHODS[args.method](args.window)
    budget = ({"keep_tokens": args.keep_tokens} if args.keep_tokens
              else {"keep_ratio": args.keep})
    with kc.Client(args.server, timeout=args.timeout) as client:
        pre = prefill_and_compress(model, input_ids, client, method, **budget)
    t = pre.num_tokens
    num_layers, h_kv, _, _ = geometry(model)
    kept = np.array([out.kept for out in pre.layers])  # [L, H_kv]
    print(f"model {args.model}: {num_layers} layers, {h_kv} KV heads; prompt T = {t} tokens; "
          f"prefill {pre.prefill_seconds * 1e3:.0f} ms (compression streamed alongside)")
    ragged = int(sum(row.min() < row.max() for row in kept))
    print(f"{args.method} {budget}: kept {int(kept.sum())} of {kept.size * t} rows "
          f"= {kept.sum() / (kept.size * t):.3f}; rows per (layer, head) {kept.min()}.."
          f"{kept.max()}; {ragged} of {num_layers} layers with ragged heads (padded, masked)")
    masses = [out.attention_mass_kept for out in pre.layers if out.attention_mass_kept is not None]
    if masses:
        print(f"attention mass kept (mean over layers): {np.mean(masses):.3f}")

    first = int(pre.last_logits.argmax())
    n = args.max_new_tokens
    full_tokens, _ = greedy(model, full_cache(model, pre.cache, t), first, n)
    comp_tokens, comp_logits = greedy(model, compressed_cache(model, pre.layers, t), first, n)
    # Teacher forcing: the compressed cache fed the full-cache continuation; top-1 agreement.
    forced = forward_tokens(model, compressed_cache(model, pre.layers, t), full_tokens[:-1])
    agree = float((forced.argmax(-1).cpu() == torch.tensor(full_tokens[1:])).float().mean()) \
        if n > 1 else 1.0
    same = next((i for i, (a, b) in enumerate(zip(full_tokens, comp_tokens)) if a != b), n)
    print(f"\nfull cache      : {tokenizer.decode(full_tokens)!r}")
    print(f"compressed cache: {tokenizer.decode(comp_tokens)!r}")
    print(f"greedy tokens identical for {same} of {n}; teacher-forced top-1 agreement "
          f"{agree:.3f}")
    if method.reducer is None or method.reducer.WhichOneof("kind") in (None, "drop"):
        if n > 1:  # the compressed run's tokens, teacher-forced through the masked reference
            masked = forward_tokens(model, masked_full_cache(model, pre.cache, pre.layers, t),
                                    comp_tokens[:-1])
            diff = float((masked - comp_logits).abs().max())
            print(f"check: compressed vs full cache with dropped positions masked, "
                  f"max |Δ logit| over {n - 1} steps = {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
