"""The Python SDK against a real kvcd; kept sets compared with `kvc compress --local`."""

import json
import subprocess
import threading

import grpc
import numpy as np
import pytest

import kvcompress as kc
from conftest import bin_dir

L, H, HQ, D, W = 3, 2, 4, 16, 8


def make_layers(t, dtype=np.float32, seed=0, scores=False, layers=L):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(layers):
        k = rng.standard_normal((H, t, D), dtype=np.float32).astype(dtype)
        v = rng.standard_normal((H, t, D), dtype=np.float32).astype(dtype)
        q = rng.standard_normal((HQ, W, D), dtype=np.float32).astype(dtype)
        s = rng.random((HQ, t), dtype=np.float32) if scores else None
        out.append(kc.LayerInput(k, v, q, s))
    return out


def run_local(tmp_path, layers, flags, tensors_to_torch=None):
    """kvc compress --local on the same layers; returns {name: tensor} of its output."""
    from safetensors.torch import load_file, save_file
    import torch

    conv = tensors_to_torch or (lambda a: torch.from_numpy(np.ascontiguousarray(a)))
    tensors = {}
    for l, layer in enumerate(layers):
        tensors[f"layers.{l}.keys"] = conv(layer.keys)
        tensors[f"layers.{l}.values"] = conv(layer.values)
        tensors[f"layers.{l}.queries"] = conv(layer.queries)
        if layer.scores is not None:
            tensors[f"layers.{l}.scores"] = torch.from_numpy(layer.scores)
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, str(src), metadata={"format": "kvcompress.cache.v1",
                                          "num_query_heads": str(HQ)})
    subprocess.run([str(bin_dir() / "kvc"), "compress", "--local", f"--input={src}",
                    f"--output={dst}", "--threads=1", *flags], check=True,
                   capture_output=True)
    return load_file(str(dst))


CASES = [
    ("snapkv", kc.Method.snapkv(window=W), ["--method=snapkv", f"--window={W}"]),
    ("snapkv_max", kc.Method.snapkv(window=W, kernel=3, pooling="max", group_reduction="max"),
     ["--method=snapkv", f"--window={W}", "--kernel-size=3", "--pooling=max",
      "--group-reduction=max"]),
    ("pyramid_adaptive", kc.Method.snapkv(window=W, layer_budget=kc.LayerBudget.pyramid(),
                                          head_budget=kc.HeadBudget.adaptive()),
     ["--method=snapkv", f"--window={W}", "--layer-budget=pyramid", "--head-budget=adaptive"]),
    ("knorm_skip", kc.Method.knorm(skip_layers=[0]), ["--method=knorm", "--skip-layers=0"]),
    ("streaming", kc.Method.streaming(sinks=2), ["--method=streaming", "--sinks=2"]),
    ("keydiff", kc.Method.keydiff(), ["--method=keydiff"]),
    ("observed_merge", kc.Method.observed(reducer=kc.Reducer.merge_similar(sigma="auto")),
     ["--method=observed", "--reducer=merge_similar", "--sigma=auto"]),
    ("knorm_merge_nearest", kc.Method.knorm(reducer=kc.Reducer.merge_nearest()),
     ["--method=knorm", "--reducer=merge_nearest"]),
]


@pytest.mark.parametrize("name,method,flags", CASES, ids=[c[0] for c in CASES])
def test_compress_matches_local(client, tmp_path, name, method, flags):
    layers = make_layers(200, seed=1, scores=name.startswith("observed"))
    if method.window == 0 and not name.startswith("observed"):
        send = [kc.LayerInput(x.keys, x.values) for x in layers]
    else:
        send = layers
    result = client.compress(send, method=method, keep_ratio=0.3)
    local = run_local(tmp_path, layers, flags + ["--keep=0.3"])
    assert result.summary.tokens_in == L * H * 200
    kept_total = 0
    for l, out in enumerate(result.layers):
        assert out.layer == l and out.sequence == 0
        np.testing.assert_array_equal(out.kept, local[f"layers.{l}.kept"].numpy())
        np.testing.assert_array_equal(out.positions, local[f"layers.{l}.positions"].numpy())
        np.testing.assert_array_equal(out.keys, local[f"layers.{l}.keys"].numpy())
        np.testing.assert_array_equal(out.values, local[f"layers.{l}.values"].numpy())
        assert out.keys.dtype == np.float32 and out.keys.shape == (out.kept.sum(), D)
        if f"layers.{l}.merged" in local:
            np.testing.assert_array_equal(out.merged, local[f"layers.{l}.merged"].numpy())
        for h in range(H):
            assert np.all(np.diff(out.head_positions(h)) > 0)
        kept_total += int(out.kept.sum())
    assert result.summary.tokens_kept == kept_total


def test_bf16_torch_and_fp16(client, tmp_path):
    torch = pytest.importorskip("torch")
    layers = make_layers(150, seed=2)
    bf = [kc.LayerInput(*(torch.from_numpy(t).to(torch.bfloat16)
                          for t in (x.keys, x.values, x.queries))) for x in layers]
    result = client.compress(bf, method=kc.Method.snapkv(window=W), keep_tokens=40)
    local = run_local(tmp_path, bf, ["--method=snapkv", f"--window={W}", "--keep-tokens=40"],
                      tensors_to_torch=lambda t: t)
    for l, out in enumerate(result.layers):
        assert out.keys.dtype == np.uint16
        np.testing.assert_array_equal(out.positions, local[f"layers.{l}.positions"].numpy())
        np.testing.assert_array_equal(
            out.keys, local[f"layers.{l}.keys"].view(torch.int16).numpy().view(np.uint16))
        assert list(out.kept) == [40] * H
    half = make_layers(150, dtype=np.float16, seed=3)
    result = client.compress([(x.keys, x.values) for x in half], method=kc.Method.knorm(),
                             keep_tokens=30)
    assert result.layers[0].keys.dtype == np.float16
    assert result.layers[0].attention_mass_kept is None


def test_batch_of_sequences_and_padded(client):
    a, b = make_layers(120, seed=4), make_layers(64, seed=5)
    result = client.compress(sequences=[a, b], method=kc.Method.snapkv(window=W),
                             keep_ratio=0.5, padded=True, merged_counts=True)
    assert len(result.sequences) == 2
    for s, t in ((0, 120), (1, 64)):
        for out in result.sequences[s]:
            assert out.padded and out.keys.shape == (H, t // 2, D)
            assert out.positions.shape == (H, t // 2)
            assert np.all(out.merged == 1)
            assert 0 < out.attention_mass_kept <= 1
    single = client.compress(b, method=kc.Method.snapkv(window=W), keep_ratio=0.5)
    for l in range(L):
        for h in range(H):
            np.testing.assert_array_equal(single.layers[l].head_positions(h),
                                          result.sequences[1][l].head_positions(h))


def test_layer_larger_than_a_chunk(client):
    t = 9000  # keys 2*9000*128*4 = 9.2 MB: three chunks per tensor
    rng = np.random.default_rng(6)
    k = rng.standard_normal((H, t, 128), dtype=np.float32)
    v = rng.standard_normal((H, t, 128), dtype=np.float32)
    result = client.compress([(k, v)], method=kc.Method.knorm(), keep_ratio=0.5)
    out = result.layers[0]
    assert out.keys.nbytes > kc.MAX_CHUNK_DATA_BYTES
    norms = -np.linalg.norm(k, axis=-1)
    for h in range(H):
        expect = np.sort(np.lexsort((np.arange(t), -norms[h]))[: t // 2])
        np.testing.assert_array_equal(out.head_positions(h), expect)
    np.testing.assert_array_equal(out.values[: out.kept[0]], v[0, out.head_positions(0)])


def test_stream_results_arrive_before_later_layers_are_sent(client):
    layers = make_layers(100, seed=7)
    header = client.header(num_layers=L, num_kv_heads=H, num_query_heads=HQ, head_dim=D,
                           dtype="fp32", num_tokens=100, method=kc.Method.snapkv(window=W),
                           keep_ratio=0.25)
    with client.stream(header) as s:
        results = s.results()
        for l, x in enumerate(layers):
            s.send_layer(l, x.keys, x.values, x.queries)
            r = next(results)  # this layer is final before the next one is sent
            assert r.layer == l and list(r.kept) == [25] * H
        assert list(results) == []
    assert s.summary.tokens_kept == L * H * 25


def test_stream_results_in_another_thread(client):
    layers = make_layers(100, seed=8)
    s = client.stream(num_layers=L, num_kv_heads=H, num_query_heads=HQ, head_dim=D,
                      dtype="fp32", num_tokens=100, method=kc.Method.snapkv(window=W),
                      keep_tokens=10)
    got = []
    reader = threading.Thread(target=lambda: got.extend(s.results()))
    reader.start()
    for l, x in enumerate(layers):
        s.send_layer(l, x.keys, x.values, x.queries)
    reader.join(timeout=60)
    assert sorted(r.layer for r in got) == list(range(L)) and s.summary is not None


def test_server_errors_carry_code_and_message(client):
    layers = make_layers(50, seed=9)
    with pytest.raises(kc.KvcError) as e:
        client.compress(layers, method=kc.Method.snapkv(window=W), keep_ratio=1.5)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "keep_ratio" in e.value.message


def test_server_error_while_sender_is_blocked(client):
    t = 9000  # 8 layers of 2 × 9.2 MB: more than the SDK buffers ahead of gRPC
    k = np.zeros((H, t, 128), dtype=np.float32)
    with pytest.raises(kc.KvcError) as e:
        client.compress([(k, k)] * 8, method=kc.Method.knorm(), keep_ratio=1.5)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_stream_context_cancels_on_exception(client):
    x = make_layers(50, seed=12, layers=2)
    with pytest.raises(RuntimeError):
        with client.stream(num_layers=2, num_kv_heads=H, num_query_heads=HQ, head_dim=D,
                           dtype="fp32", num_tokens=50, method=kc.Method.snapkv(window=W),
                           keep_ratio=0.5) as s:
            s.send_layer(0, x[0].keys, x[0].values, x[0].queries)
            raise RuntimeError("prefill failed")
    with pytest.raises(kc.KvcError) as e:
        list(s.results())
    assert e.value.code == grpc.StatusCode.CANCELLED
    assert client.health() == "SERVING"


def test_client_side_validation(client):
    x = make_layers(50, seed=10)[0]
    s = client.stream(num_layers=1, num_kv_heads=H, num_query_heads=HQ, head_dim=D,
                      dtype="fp32", num_tokens=51, method=kc.Method.snapkv(window=W),
                      keep_ratio=0.5)
    with s, pytest.raises(kc.KvcError) as e:
        s.send_layer(0, x.keys, x.values, x.queries)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected shape [2, 51, 16], got [2, 50, 16]" in e.value.message
    with pytest.raises(kc.KvcError) as e:
        client.compress([(x.keys.astype(np.float64), x.values)], method=kc.Method.knorm(),
                        keep_ratio=0.5)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ValueError):
        kc.Method.snapkv(pooling="median")


def test_deadline(client):
    x = make_layers(50, seed=11, layers=2)
    s = client.stream(num_layers=2, num_kv_heads=H, num_query_heads=HQ, head_dim=D,
                      dtype="fp32", num_tokens=50, method=kc.Method.snapkv(window=W),
                      keep_ratio=0.5, timeout=0.5)
    s.send_layer(0, x[0].keys, x[0].values, x[0].queries)  # layer 1 never comes
    with pytest.raises(kc.KvcError) as e:
        list(s.results())
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_server_info_health_and_unavailable(client):
    info = client.server_info()
    assert info.version and info.backend
    names = {m.name for m in info.methods}
    assert {"snapkv", "knorm", "pyramid", "adaptive", "merge_similar"} <= names
    assert info.limits.max_chunk_bytes >= kc.MAX_CHUNK_DATA_BYTES
    assert client.health() == "SERVING"
    assert client.health("kvcompress.v1.KvCompress") == "SERVING"
    with kc.Client("127.0.0.1:1", timeout=2) as dead:
        with pytest.raises(kc.KvcError) as e:
            dead.server_info()
    assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_method_spec_mirrors_proto():
    spec = kc.Method.snapkv(layer_budget=kc.LayerBudget.dynamic(),
                            reducer=kc.Reducer.merge_similar(similarity_threshold=0.8),
                            protect_sinks=4).to_proto(keep_tokens=128)
    assert spec.scorer.snapkv.window_size == 64 and spec.scorer.snapkv.kernel_size == 5
    assert spec.scorer.snapkv.pooling == kc.pb.POOLING_AVG
    assert spec.layer_budget.dynamic.update_interval == 4
    assert spec.reducer.merge_similar.similarity_threshold == pytest.approx(0.8)
    assert spec.keep_tokens == 128 and spec.protect_sinks == 4
    with pytest.raises(ValueError):
        kc.Method.knorm().to_proto()
