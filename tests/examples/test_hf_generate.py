"""client/python/examples/hf_generate.py on a real model (stories260K through transformers)
against a real kvcd.

  * keep-all: the cache that went through kvcd, padded and masked, generates exactly what
    stock transformers `generate` (eager attention, full cache) generates, logits included.
  * keep 0.5 (SnapKV, and AdaKV whose heads keep different counts, so slots are padded):
    the compressed cache's logits over every decode step equal those of the full cache with
    the dropped positions masked out per (layer, head), both through transformers and through
    an independent float64 numpy Llama (tests/quality/gguf_llama.py) given per-head masks.
    The compressed cache is shorter than the prompt, so wrong RoPE positions for new tokens
    (the cache length instead of T) or an unmasked padding slot fail these comparisons; the
    masked logits must also differ clearly from the unmasked full cache's (the check bites).
  * the kept sets streamed during prefill equal `kvc compress --local` on the same tensors
    (written as a kvcompress safetensors cache) and the SDK's one-call padded result; they
    are per head ascending, unique, in range, include the window and meet the budget.
"""

import copy
import subprocess

import numpy as np
import pytest
import torch

import hf_generate as hf
import kvcompress as kc
from conftest import REPO, bin_dir

T = 320  # prompt tokens (BOS included), from tests/quality/texts/story_1.txt
W = 32  # SnapKV observation window
STEPS = 16  # generated tokens
KEEP = 0.5
STORY = REPO / "tests" / "quality" / "texts" / "story_1.txt"

METHODS = {
    "snapkv": (kc.Method.snapkv(window=W), ["--method=snapkv", f"--window={W}"]),
    "adakv": (kc.Method.snapkv(window=W, head_budget=kc.HeadBudget.adaptive()),
              ["--method=snapkv", f"--window={W}", "--head-budget=adaptive"]),
}


@pytest.fixture(scope="module")
def model_and_tokenizer(stories_path):
    torch.manual_seed(0)
    return hf.load_model(stories_path, dtype="fp32")


@pytest.fixture(scope="module")
def model(model_and_tokenizer):
    return model_and_tokenizer[0]


@pytest.fixture(scope="module")
def prompt(model_and_tokenizer):
    ids = model_and_tokenizer[1](STORY.read_text(), return_tensors="pt")["input_ids"]
    assert ids.shape[1] >= T and int(ids[0, 0]) == 1  # BOS first
    return ids[:, :T]


@pytest.fixture(scope="module")
def numpy_model(stories_path):
    import gguf_llama as gl

    return gl.LlamaModel(stories_path, dtype=np.float64)


def compressed_run(model, prompt, client, method, keep):
    pre = hf.prefill_and_compress(model, prompt, client, method, keep_ratio=keep)
    first = int(pre.last_logits.argmax())
    tokens, logits = hf.greedy(model, hf.compressed_cache(model, pre.layers, T), first, STEPS)
    return pre, tokens, logits


def test_keep_all_equals_stock_generate(model, prompt, client):
    pre, tokens, logits = compressed_run(model, prompt, client, kc.Method.snapkv(window=W), 1.0)
    h_kv = model.config.num_key_value_heads
    for layer, out in enumerate(pre.layers):
        assert list(out.kept) == [T] * h_kv
        for h in range(h_kv):
            np.testing.assert_array_equal(out.head_positions(h), np.arange(T))
        np.testing.assert_array_equal(
            out.keys, pre.cache.layers[layer].keys[0, :, :T].reshape(-1, out.keys.shape[-1]))

    stock = copy.deepcopy(model)
    stock.set_attn_implementation("eager")
    with torch.no_grad():
        g = stock.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                           max_new_tokens=STEPS, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=0)
    assert g.sequences[0, T:].tolist() == tokens
    stock_logits = torch.stack([x[0] for x in g.logits]).float()  # [STEPS, V]
    torch.testing.assert_close(pre.last_logits, stock_logits[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, stock_logits[1:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_compressed_equals_masked_full_cache(model, prompt, client, numpy_model, name):
    import gguf_llama as gl

    method = METHODS[name][0]
    pre, tokens, comp = compressed_run(model, prompt, client, method, KEEP)
    kept = np.array([out.kept for out in pre.layers])
    if name == "adakv":  # ragged heads: some slots are padding
        assert any(row.min() < row.max() for row in kept), kept
    assert kept.max() < T  # every layer's cache is shorter than the prompt

    # The same decode steps (the compressed run's tokens, teacher-forced) on the full cache
    # with each head's dropped positions masked out, then on the plain full cache.
    masked = hf.forward_tokens(model, hf.masked_full_cache(model, pre.cache, pre.layers, T),
                               tokens[:-1])
    full = hf.forward_tokens(model, hf.full_cache(model, pre.cache, T), tokens[:-1])
    torch.testing.assert_close(comp[0], masked[0], atol=1e-4, rtol=0)  # first decode step
    torch.testing.assert_close(comp, masked, atol=1e-4, rtol=0)
    assert float((full - masked).abs().max()) > 0.05  # eviction does change the logits

    # Independent reference: the float64 numpy Llama over prompt + continuation, with masks
    # replacing the causal one: row t >= T sees the kept positions of its head plus T..t.
    n = T + STEPS - 1
    h_kv = kept.shape[1]
    causal = np.tril(np.ones((n, n), dtype=bool))
    masks = []
    for out in pre.layers:
        m = np.repeat(causal[None], h_kv, axis=0)
        for h in range(h_kv):
            m[h, T:, :T] = False
            m[h, T:, out.head_positions(h)] = True
        masks.append(m)
    seq = prompt[0].tolist() + tokens[:-1]
    ref = gl.Forward(numpy_model).run(np.array(seq), masks=masks, logits_from=T)["logits"]
    np.testing.assert_allclose(comp.numpy(), ref, atol=2e-4, rtol=0)


def capture_prefill(model, prompt):
    """The tensors kvcd is sent: per layer post-RoPE keys, values [H_kv, T, D] and the last W
    queries [H_q, W, D], as numpy fp32."""
    layers = {}

    def capture(layer, query, key, value):
        layers[layer] = kc.LayerInput(key[0].numpy().copy(), value[0].numpy().copy(),
                                      query[0, :, T - W:].numpy().copy())

    with torch.no_grad():
        model(input_ids=prompt, use_cache=True, kvc_capture=capture)
    return [layers[layer] for layer in range(len(layers))]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_kept_sets_match_local_and_padded(model, prompt, client, tmp_path, name):
    from safetensors.numpy import load_file, save_file

    method, flags = METHODS[name]
    sent = capture_prefill(model, prompt)
    pre = hf.prefill_and_compress(model, prompt, client, method, keep_ratio=KEEP)
    for layer, x in enumerate(sent):  # deterministic: the streamed prefill sent the same
        np.testing.assert_array_equal(x.keys, pre.cache.layers[layer].keys[0].numpy())

    tensors = {}
    for layer, x in enumerate(sent):
        tensors.update({f"layers.{layer}.keys": x.keys, f"layers.{layer}.values": x.values,
                        f"layers.{layer}.queries": x.queries})
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, str(src), metadata={
        "format": "kvcompress.cache.v1", "num_query_heads": str(model.config.num_attention_heads)})
    subprocess.run([str(bin_dir() / "kvc"), "compress", "--local", f"--input={src}",
                    f"--output={dst}", "--threads=1", f"--keep={KEEP}", *flags], check=True,
                   capture_output=True)
    local = load_file(str(dst))
    padded = client.compress(sent, method=method, keep_ratio=KEEP, padded=True)

    n = int(T * KEEP)
    for layer, out in enumerate(pre.layers):
        np.testing.assert_array_equal(out.kept, local[f"layers.{layer}.kept"])
        np.testing.assert_array_equal(out.positions, local[f"layers.{layer}.positions"])
        np.testing.assert_array_equal(out.keys, local[f"layers.{layer}.keys"])
        np.testing.assert_array_equal(out.values, local[f"layers.{layer}.values"])
        h_kv = len(out.kept)
        if name == "adakv":
            assert int(out.kept.sum()) == h_kv * n
        else:
            assert list(out.kept) == [n] * h_kv
        for h in range(h_kv):
            pos = out.head_positions(h)
            assert np.all(np.diff(pos) > 0) and pos[0] >= 0 and pos[-1] < T
            assert set(range(T - W, T)) <= set(pos.tolist())  # the window is always kept
            np.testing.assert_array_equal(padded.layers[layer].head_positions(h), pos)
            np.testing.assert_array_equal(out.keys[out.offsets[h]: out.offsets[h + 1]],
                                          sent[layer].keys[h, pos])
