"""The kvcompress Python SDK: a blocking gRPC client for kvcd.

    client = kvcompress.Client("localhost:50051")
    result = client.compress([(k0, v0, q0), (k1, v1, q1)], method=Method.snapkv(),
                             keep_ratio=0.25)
    result.layers[0].keys       # [Σ kept, D], input dtype
    result.summary.tokens_kept

Tensors are numpy arrays or torch tensors (moved to CPU): keys/values [H_kv, T, D] (layout
"hnd", default) or [T, H_kv, D] ("nhd"), queries [H_q, W, D], scores [H, T] (fp32).
fp16 and fp32 map to themselves; bf16 comes from torch.bfloat16, an ml_dtypes bfloat16 array,
or a uint16 array with dtype="bf16". bf16 results are uint16 arrays holding the bf16 bits.

Every failure raises `KvcError(code, message)` with the gRPC status code; INVALID_ARGUMENT
before anything is sent for inputs inconsistent with the header, INTERNAL for a result stream
that breaks the protocol, DATA_LOSS when it ends without a summary. Each call has a deadline
(`timeout`, seconds). A Client is thread-safe; a Stream belongs to one thread at a time, except
that `results()` may be read in another thread than the one calling `send_layer`.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import grpc
import numpy as np

from kvcompress._proto import health_pb2, health_pb2_grpc
from kvcompress._proto import kvcompress_pb2 as pb
from kvcompress._proto import kvcompress_pb2_grpc as pb_grpc
from kvcompress.method import Method

MAX_CHUNK_DATA_BYTES = 4 * 1024 * 1024 - 1024
_SEND_QUEUE_CHUNKS = 16  # ~64 MiB of chunks buffered ahead of gRPC

_DTYPES = {"fp16": pb.DTYPE_FLOAT16, "bf16": pb.DTYPE_BFLOAT16, "fp32": pb.DTYPE_FLOAT32}
_NUMPY_DTYPES = {pb.DTYPE_FLOAT16: np.dtype(np.float16), pb.DTYPE_BFLOAT16: np.dtype(np.uint16),
                 pb.DTYPE_FLOAT32: np.dtype(np.float32)}
_LAYOUTS = {"hnd": pb.LAYOUT_HND, "nhd": pb.LAYOUT_NHD}


class KvcError(Exception):
    """A failed call: `code` is a grpc.StatusCode, `message` the server's (or SDK's) text."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def _from_rpc_error(error: grpc.RpcError) -> KvcError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return KvcError(code or grpc.StatusCode.UNKNOWN, details or "")


def _invalid(message: str) -> KvcError:
    return KvcError(grpc.StatusCode.INVALID_ARGUMENT, message)


# ---------------------------------------------------------------------------
# Tensors.

def _to_numpy(x: Any, name: str) -> Tuple[np.ndarray, Optional[int]]:
    """Contiguous numpy array and its wire dtype (None when the dtype says nothing)."""
    if type(x).__module__.split(".")[0] == "torch":
        import torch  # only when the caller already uses torch

        x = x.detach().to("cpu").contiguous()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(np.uint16), pb.DTYPE_BFLOAT16
        x = x.numpy()
    x = np.ascontiguousarray(x)
    if x.dtype == np.float16:
        return x, pb.DTYPE_FLOAT16
    if x.dtype == np.float32:
        return x, pb.DTYPE_FLOAT32
    if x.dtype.name == "bfloat16":  # ml_dtypes
        return x.view(np.uint16), pb.DTYPE_BFLOAT16
    if x.dtype == np.uint16:
        return x, None
    raise _invalid(f"{name}: expected fp16, bf16 or fp32 elements, got {x.dtype}")


@dataclasses.dataclass
class LayerInput:
    """The tensors of one layer of one sequence."""

    keys: Any
    values: Any
    queries: Any = None
    scores: Any = None


def _as_layer_input(item: Any) -> LayerInput:
    if isinstance(item, LayerInput):
        return item
    if isinstance(item, dict):
        return LayerInput(**item)
    if isinstance(item, (tuple, list)) and 2 <= len(item) <= 4:
        return LayerInput(*item)
    raise _invalid("layer: expected LayerInput, dict or (keys, values[, queries[, scores]]), "
                   f"got {type(item).__name__}")


@dataclasses.dataclass
class LayerOutput:
    """The compressed cache of one layer of one sequence.

    Ragged (default): keys/values [Σ kept, D], heads in order, positions ascending per head;
    `offsets` [H_kv + 1] delimit the heads. Padded: keys/values [H_kv, max_kept, D],
    positions [H_kv, max_kept] padded with −1. `merged` is None unless sent.
    """

    sequence: int
    layer: int
    kept: np.ndarray  # int64 [H_kv]
    keys: np.ndarray
    values: np.ndarray
    positions: np.ndarray  # int32
    merged: Optional[np.ndarray]  # int32
    attention_mass_kept: Optional[float]  # None when the scorer computes no attention
    padded: bool = False

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.kept)]).astype(np.int64)

    def head_positions(self, head: int) -> np.ndarray:
        """Kept original positions of one KV head."""
        if self.padded:
            return self.positions[head, : self.kept[head]]
        o = self.offsets
        return self.positions[o[head]: o[head + 1]]


@dataclasses.dataclass
class CompressResult:
    sequences: List[List[LayerOutput]]  # [sequence][layer]
    summary: pb.CompressSummary

    @property
    def layers(self) -> List[LayerOutput]:
        """The layers of sequence 0 (the single-sequence case)."""
        return self.sequences[0]


# ---------------------------------------------------------------------------
# Streams.

class _ResultAssembler:
    """Turns CompressResponse messages into LayerOutputs, checking the protocol."""

    def __init__(self, header: pb.CompressHeader):
        g = header.geometry
        self._header = header
        self._dtype = _NUMPY_DTYPES[g.dtype]
        self._pending: Dict[Tuple[int, int], Tuple[pb.LayerResult, Dict[int, bytearray]]] = {}
        self._done: set = set()
        self.expected = len(header.sequences) * g.num_layers

    @staticmethod
    def _protocol(message: str) -> KvcError:
        return KvcError(grpc.StatusCode.INTERNAL, f"result stream: {message}")

    def add(self, response: pb.CompressResponse) -> Optional[LayerOutput]:
        kind = response.WhichOneof("payload")
        g = self._header.geometry
        if kind == "layer_result":
            r = response.layer_result
            key = (r.sequence, r.layer)
            if (r.sequence >= len(self._header.sequences) or r.layer >= g.num_layers
                    or key in self._pending or key in self._done):
                raise self._protocol(f"unexpected layer result sequence {r.sequence} "
                                     f"layer {r.layer}")
            if len(r.kept) != g.num_kv_heads:
                raise self._protocol(f"layer {r.layer}: expected {g.num_kv_heads} kept counts, "
                                     f"got {len(r.kept)}")
            self._pending[key] = (r, {})
            return self._maybe_finish(key)
        if kind == "result_chunk":
            c = response.result_chunk
            key = (c.sequence, c.layer)
            if key not in self._pending:
                raise self._protocol(f"chunk for sequence {c.sequence} layer {c.layer} "
                                     "before its layer result")
            parts = self._pending[key][1]
            buf = parts.setdefault(c.tensor, bytearray())
            if c.offset != len(buf):
                raise self._protocol(f"layer {c.layer} tensor {c.tensor}: expected offset "
                                     f"{len(buf)}, got {c.offset}")
            buf += c.data
            return self._maybe_finish(key)
        raise self._protocol(f"unexpected {kind} message")

    def _maybe_finish(self, key) -> Optional[LayerOutput]:
        r, parts = self._pending[key]
        wanted = {pb.TENSOR_KIND_KEYS: r.keys_bytes, pb.TENSOR_KIND_VALUES: r.values_bytes,
                  pb.TENSOR_KIND_POSITIONS: r.positions_bytes,
                  pb.TENSOR_KIND_MERGED: r.merged_bytes}
        for tensor, size in wanted.items():
            got = len(parts.get(tensor, b""))
            if got > size:
                raise self._protocol(f"layer {r.layer} tensor {tensor}: {got} bytes, "
                                     f"announced {size}")
            if got < size:
                return None
        del self._pending[key]
        self._done.add(key)
        d = self._header.geometry.head_dim
        padded = r.format == pb.OUTPUT_FORMAT_PADDED
        kept = np.asarray(r.kept, dtype=np.int64)
        rows = (g_h := len(kept)) * r.max_kept if padded else int(kept.sum())
        shape = (g_h, r.max_kept) if padded else (rows,)
        try:
            keys = np.frombuffer(bytes(parts.get(pb.TENSOR_KIND_KEYS, b"")),
                                 self._dtype).reshape(*shape, d)
            values = np.frombuffer(bytes(parts.get(pb.TENSOR_KIND_VALUES, b"")),
                                   self._dtype).reshape(*shape, d)
            positions = np.frombuffer(bytes(parts.get(pb.TENSOR_KIND_POSITIONS, b"")),
                                      "<i4").reshape(shape)
            merged = None
            if r.merged_bytes:
                merged = np.frombuffer(bytes(parts[pb.TENSOR_KIND_MERGED]), "<i4").reshape(shape)
        except ValueError as e:
            raise self._protocol(f"layer {r.layer}: sizes do not match kept counts ({e})")
        mass = None if r.attention_mass_kept < 0 else r.attention_mass_kept
        return LayerOutput(r.sequence, r.layer, kept, keys, values, positions, merged, mass,
                           padded)

    def check_complete(self) -> None:
        if self._pending or len(self._done) != self.expected:
            raise self._protocol(f"summary after {len(self._done)} of {self.expected} layers")


_CLOSE = object()


class Stream:
    """One Compress call: send layers with `send_layer`, read them back with `results()`.

    Results arrive as soon as each layer is final, while later layers are still being sent.
    The request half-closes itself once every (sequence, layer) was sent, or on `close_send`.
    Use as a context manager: leaving it on an exception cancels the call.
    """

    def __init__(self, stub: pb_grpc.KvCompressStub, header: pb.CompressHeader,
                 timeout: Optional[float], metadata):
        self._header = header
        g = header.geometry
        self._dtype = g.dtype
        self._queue: "queue.Queue" = queue.Queue(maxsize=_SEND_QUEUE_CHUNKS)
        self._sent: set = set()
        self._closed = False
        self._cancelled = False
        self._assembler = _ResultAssembler(header)
        self.summary: Optional[pb.CompressSummary] = None
        self._queue.put(pb.CompressRequest(header=header))
        self._call = stub.Compress(self._requests(), timeout=timeout, metadata=metadata)
        self._responses = iter(self._call)

    def _requests(self) -> Iterator[pb.CompressRequest]:
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                return
            yield item

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.summary is None:
            self.cancel()

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()
        self._close()

    def _put(self, item) -> None:
        """Queues a request; gives up once the call is cancelled (gRPC stops reading)."""
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._cancelled:
                    if item is _CLOSE:
                        return
                    raise KvcError(grpc.StatusCode.CANCELLED, "the call was cancelled")

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._put(_CLOSE)

    def close_send(self) -> None:
        """Half-closes: no more layers will be sent."""
        self._close()

    def _tensor_bytes(self, name: str, x: Any, shape: Tuple[int, ...], scores: bool) -> np.ndarray:
        if scores:
            array = np.ascontiguousarray(
                x.detach().to("cpu").float().numpy() if type(x).__module__.startswith("torch")
                else x, dtype=np.float32)
        else:
            array, dtype = _to_numpy(x, name)
            if dtype is not None and dtype != self._dtype:
                raise _invalid(f"{name}: expected dtype {pb.DType.Name(self._dtype)}, got "
                               f"{pb.DType.Name(dtype)}")
            if dtype is None and self._dtype != pb.DTYPE_BFLOAT16:
                raise _invalid(f"{name}: uint16 elements are bf16 bits; the header says "
                               f"{pb.DType.Name(self._dtype)}")
        if tuple(array.shape) != shape:
            raise _invalid(f"{name}: expected shape {list(shape)}, got {list(array.shape)}")
        return array

    def send_layer(self, layer: int, keys: Any, values: Any, queries: Any = None,
                   scores: Any = None, *, sequence: int = 0) -> None:
        """Queues one layer's tensors (shapes checked against the header first)."""
        g = self._header.geometry
        if self._closed:
            raise _invalid("send_layer after the request was closed")
        if sequence >= len(self._header.sequences) or layer >= g.num_layers:
            raise _invalid(f"sequence {sequence} layer {layer}: out of range "
                           f"({len(self._header.sequences)} sequences, {g.num_layers} layers)")
        if (sequence, layer) in self._sent:
            raise _invalid(f"sequence {sequence} layer {layer}: sent twice")
        seq = self._header.sequences[sequence]
        t, h, hq, d = seq.num_tokens, g.num_kv_heads, g.num_query_heads, g.head_dim
        kv_shape = (h, t, d) if g.layout != pb.LAYOUT_NHD else (t, h, d)
        where = f"sequence {sequence} layer {layer}"
        tensors = [(pb.TENSOR_KIND_KEYS, self._tensor_bytes(f"{where} keys", keys, kv_shape, False)),
                   (pb.TENSOR_KIND_VALUES,
                    self._tensor_bytes(f"{where} values", values, kv_shape, False))]
        if seq.num_window_queries:
            if queries is None:
                raise _invalid(f"{where} queries: the header announces "
                               f"{seq.num_window_queries} window queries, none given")
            tensors.append((pb.TENSOR_KIND_QUERIES, self._tensor_bytes(
                f"{where} queries", queries, (hq, seq.num_window_queries, d), False)))
        if seq.num_score_heads:
            if scores is None:
                raise _invalid(f"{where} scores: the header announces scores, none given")
            tensors.append((pb.TENSOR_KIND_SCORES, self._tensor_bytes(
                f"{where} scores", scores, (seq.num_score_heads, t), True)))
        self._sent.add((sequence, layer))
        for kind, array in tensors:
            data = memoryview(array.reshape(-1).view(np.uint8))
            for offset in range(0, max(len(data), 1), MAX_CHUNK_DATA_BYTES):
                self._put(pb.CompressRequest(chunk=pb.TensorChunk(
                    sequence=sequence, layer=layer, tensor=kind, offset=offset,
                    data=bytes(data[offset: offset + MAX_CHUNK_DATA_BYTES]))))
        if len(self._sent) == self._assembler.expected:
            self._close()

    def results(self) -> Iterator[LayerOutput]:
        """Yields each layer as it becomes final; sets `summary` at the end."""
        try:
            for response in self._responses:
                if response.WhichOneof("payload") == "summary":
                    self._assembler.check_complete()
                    self.summary = response.summary
                    continue
                if self.summary is not None:
                    raise KvcError(grpc.StatusCode.INTERNAL,
                                   "result stream: message after the summary")
                out = self._assembler.add(response)
                if out is not None:
                    yield out
        except grpc.RpcError as e:
            self._cancelled = True
            self._close()
            raise _from_rpc_error(e) from None
        except KvcError:
            self.cancel()
            raise
        if self.summary is None:
            raise KvcError(grpc.StatusCode.DATA_LOSS, "result stream ended without a summary")


# ---------------------------------------------------------------------------
# Client.

def _pem(value: Union[bytes, str, None], name: str) -> Optional[bytes]:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise _invalid(f"{name}: expected PEM bytes or str, got {type(value).__name__}")


class Client:
    """A connection to kvcd. `target` is a gRPC target ("host:port", "dns:///svc:50051").

    timeout: default deadline of each call in seconds. options: extra grpc channel options,
    e.g. [("grpc.lb_policy_name", "round_robin")] for a headless Service. metadata: sent with
    every call.

    Security (kvcd --tls_cert/--tls_key, --tls_client_ca, --auth_token_file):
      root_certificates: PEM of the CAs that sign kvcd's certificate; turns TLS on (with
        tls=True alone, the system's roots are trusted).
      private_key, certificate_chain: PEM of this client's key and certificate, for mTLS.
      tls_server_name: the name kvcd's certificate must carry, instead of the target's host.
      auth_token: sent as "authorization: Bearer <token>" on every call. Without TLS it
        crosses the network in plaintext.
      credentials: a ready grpc.ChannelCredentials instead of the PEM arguments.
    PEM arguments are bytes or str (the file's content, not its path).
    """

    def __init__(self, target: str, *, timeout: float = 300.0,
                 credentials: Optional[grpc.ChannelCredentials] = None,
                 options: Sequence[Tuple[str, Any]] = (), metadata=None,
                 tls: bool = False,
                 root_certificates: Union[bytes, str, None] = None,
                 private_key: Union[bytes, str, None] = None,
                 certificate_chain: Union[bytes, str, None] = None,
                 tls_server_name: Optional[str] = None,
                 auth_token: Optional[str] = None):
        self.timeout = timeout
        root_certificates = _pem(root_certificates, "root_certificates")
        private_key = _pem(private_key, "private_key")
        certificate_chain = _pem(certificate_chain, "certificate_chain")
        if (private_key is None) != (certificate_chain is None):
            raise _invalid("private_key and certificate_chain go together (mTLS); "
                           f"{'certificate_chain' if private_key is None else 'private_key'} "
                           "is given, the other is not")
        pem_tls = tls or root_certificates is not None or private_key is not None
        if credentials is not None and pem_tls:
            raise _invalid("give credentials or the TLS arguments, not both")
        if pem_tls:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key,
                                                       certificate_chain)
        options = list(options)
        if tls_server_name:
            if credentials is None:
                raise _invalid("tls_server_name needs TLS: give root_certificates or tls=True")
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        metadata = list(metadata or [])
        if auth_token is not None:
            if not auth_token or any(not 0x21 <= ord(c) <= 0x7e for c in auth_token):
                raise _invalid("auth_token: expected a non-empty printable ASCII token")
            metadata.append(("authorization", f"Bearer {auth_token}"))
        self._metadata = metadata or None
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.KvCompressStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _timeout(self, timeout: Optional[float]) -> Optional[float]:
        return self.timeout if timeout is None else timeout

    def server_info(self, *, timeout: Optional[float] = None) -> pb.ServerInfo:
        try:
            return self._stub.GetServerInfo(pb.GetServerInfoRequest(),
                                            timeout=self._timeout(timeout),
                                            metadata=self._metadata)
        except grpc.RpcError as e:
            raise _from_rpc_error(e) from None

    def health(self, service: str = "", *, timeout: Optional[float] = None) -> str:
        """grpc.health.v1 status name: "SERVING", "NOT_SERVING", ..."""
        try:
            r = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                   timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise _from_rpc_error(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    @staticmethod
    def header(*, num_layers: int, num_kv_heads: int, num_query_heads: int, head_dim: int,
               dtype: str, num_tokens: Union[int, Sequence[int]], method: Method,
               keep_ratio: Optional[float] = None, keep_tokens: Optional[int] = None,
               num_window_queries: Union[int, Sequence[int], None] = None,
               num_score_heads: Union[int, Sequence[int]] = 0, layout: str = "hnd",
               padded: bool = False, merged_counts: bool = False,
               request_id: str = "") -> pb.CompressHeader:
        """A CompressHeader. num_tokens (and the per-sequence counts) may be one value or one
        per sequence; num_window_queries defaults to the method's window."""
        counts = [num_tokens] if isinstance(num_tokens, int) else list(num_tokens)

        def per_sequence(v, name):
            v = [v] * len(counts) if isinstance(v, int) else list(v)
            if len(v) != len(counts):
                raise _invalid(f"{name}: expected {len(counts)} values, got {len(v)}")
            return v

        if num_window_queries is None:
            num_window_queries = method.window
        windows = per_sequence(num_window_queries, "num_window_queries")
        score_heads = per_sequence(num_score_heads, "num_score_heads")
        return pb.CompressHeader(
            request_id=request_id,
            geometry=pb.CacheGeometry(num_layers=num_layers, num_kv_heads=num_kv_heads,
                                      num_query_heads=num_query_heads, head_dim=head_dim,
                                      dtype=_DTYPES[dtype] if dtype in _DTYPES else
                                      _invalid_dtype(dtype),
                                      layout=_LAYOUTS[layout]),
            sequences=[pb.SequenceShape(num_tokens=t, num_window_queries=w, num_score_heads=s)
                       for t, w, s in zip(counts, windows, score_heads)],
            method=method.to_proto(keep_ratio, keep_tokens),
            output=pb.OutputSpec(format=pb.OUTPUT_FORMAT_PADDED if padded
                                 else pb.OUTPUT_FORMAT_RAGGED,
                                 return_merged_counts=merged_counts),
            transport=pb.TRANSPORT_INLINE)

    def stream(self, header: Optional[pb.CompressHeader] = None, *,
               timeout: Optional[float] = None, **header_fields) -> Stream:
        """Opens a Compress stream from a header (or the fields of `Client.header`)."""
        if header is None:
            header = self.header(**header_fields)
        elif header_fields:
            raise _invalid("give either a header or its fields, not both")
        try:
            return Stream(self._stub, header, self._timeout(timeout), self._metadata)
        except grpc.RpcError as e:
            raise _from_rpc_error(e) from None

    def compress(self, layers: Optional[Sequence[Any]] = None, *,
                 sequences: Optional[Sequence[Sequence[Any]]] = None, method: Method,
                 keep_ratio: Optional[float] = None, keep_tokens: Optional[int] = None,
                 dtype: Optional[str] = None, layout: str = "hnd", padded: bool = False,
                 merged_counts: bool = False, request_id: str = "",
                 timeout: Optional[float] = None) -> CompressResult:
        """Compresses one sequence (`layers`) or a batch (`sequences`, each a list of layers).

        A layer is (keys, values[, queries[, scores]]), a dict or a LayerInput. Geometry and
        dtype come from the tensors; dtype="bf16" marks uint16 arrays as bf16 bits.
        """
        if (layers is None) == (sequences is None):
            raise _invalid("give exactly one of layers and sequences")
        batch = [list(layers)] if sequences is None else [list(s) for s in sequences]
        batch = [[_as_layer_input(item) for item in seq] for seq in batch]
        if not batch or not batch[0]:
            raise _invalid("layers: expected at least one sequence with one layer")
        num_layers = len(batch[0])
        for i, seq in enumerate(batch):
            if len(seq) != num_layers:
                raise _invalid(f"sequence {i}: expected {num_layers} layers, got {len(seq)}")
        first = batch[0][0]
        k, wire = _to_numpy(first.keys, "sequence 0 layer 0 keys")
        if wire is None:
            if dtype != "bf16":
                raise _invalid("keys: uint16 arrays need dtype='bf16'")
            wire = pb.DTYPE_BFLOAT16
        if dtype is not None and _DTYPES.get(dtype) != wire:
            raise _invalid(f"dtype: {dtype!r} given, the tensors are {pb.DType.Name(wire)}")
        if k.ndim != 3:
            raise _invalid(f"sequence 0 layer 0 keys: expected 3 dimensions, got {k.ndim}")
        h, d = (k.shape[0], k.shape[2]) if layout == "hnd" else (k.shape[1], k.shape[2])
        tokens, windows, score_heads = [], [], []
        hq = h
        for i, seq in enumerate(batch):
            shape = tuple(seq[0].keys.shape)
            tokens.append(shape[1] if layout == "hnd" else shape[0])
            q, s = seq[0].queries, seq[0].scores
            windows.append(0 if q is None else int(q.shape[1]))
            score_heads.append(0 if s is None else int(s.shape[0]))
            if q is not None:
                hq = int(q.shape[0])
        if method.scorer_name == "observed" and score_heads[0] and hq == h:
            hq = max(hq, score_heads[0])
        wire_name = {v: n for n, v in _DTYPES.items()}[wire]
        header = self.header(num_layers=num_layers, num_kv_heads=h, num_query_heads=hq,
                             head_dim=d, dtype=wire_name, num_tokens=tokens, method=method,
                             keep_ratio=keep_ratio, keep_tokens=keep_tokens,
                             num_window_queries=windows, num_score_heads=score_heads,
                             layout=layout, padded=padded, merged_counts=merged_counts,
                             request_id=request_id)
        out: List[List[Optional[LayerOutput]]] = [[None] * num_layers for _ in batch]
        stream = self.stream(header, timeout=timeout)
        sender_error: List[BaseException] = []

        def send_all() -> None:
            try:
                for si, seq in enumerate(batch):
                    for li, layer in enumerate(seq):
                        stream.send_layer(li, layer.keys, layer.values, layer.queries,
                                          layer.scores, sequence=si)
            except BaseException as e:  # reported by the caller's thread
                sender_error.append(e)
                stream.cancel()

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        try:
            for result in stream.results():
                out[result.sequence][result.layer] = result
        except KvcError:
            sender.join()
            # A sender stopped by the failed call reports CANCELLED; the call's error is the news.
            if sender_error and getattr(sender_error[0], "code", None) != grpc.StatusCode.CANCELLED:
                raise sender_error[0] from None
            raise
        sender.join()
        if sender_error:
            raise sender_error[0]
        return CompressResult(out, stream.summary)


def _invalid_dtype(dtype: str):
    raise _invalid(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
