from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]

class Layout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYOUT_UNSPECIFIED: _ClassVar[Layout]
    LAYOUT_HND: _ClassVar[Layout]
    LAYOUT_NHD: _ClassVar[Layout]

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_UNSPECIFIED: _ClassVar[Pooling]
    POOLING_AVG: _ClassVar[Pooling]
    POOLING_MAX: _ClassVar[Pooling]

class GroupReduction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GROUP_REDUCTION_UNSPECIFIED: _ClassVar[GroupReduction]
    GROUP_REDUCTION_MEAN: _ClassVar[GroupReduction]
    GROUP_REDUCTION_MAX: _ClassVar[GroupReduction]
    GROUP_REDUCTION_SUM: _ClassVar[GroupReduction]

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_RAGGED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_PADDED: _ClassVar[OutputFormat]

class Transport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSPORT_UNSPECIFIED: _ClassVar[Transport]
    TRANSPORT_INLINE: _ClassVar[Transport]
    TRANSPORT_CUDA_IPC: _ClassVar[Transport]
    TRANSPORT_NCCL: _ClassVar[Transport]

class TensorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_KIND_UNSPECIFIED: _ClassVar[TensorKind]
    TENSOR_KIND_KEYS: _ClassVar[TensorKind]
    TENSOR_KIND_VALUES: _ClassVar[TensorKind]
    TENSOR_KIND_QUERIES: _ClassVar[TensorKind]
    TENSOR_KIND_SCORES: _ClassVar[TensorKind]
    TENSOR_KIND_POSITIONS: _ClassVar[TensorKind]
    TENSOR_KIND_MERGED: _ClassVar[TensorKind]

class ChannelDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHANNEL_DIRECTION_UNSPECIFIED: _ClassVar[ChannelDirection]
    CHANNEL_DIRECTION_TO_KVCD: _ClassVar[ChannelDirection]
    CHANNEL_DIRECTION_FROM_KVCD: _ClassVar[ChannelDirection]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT32: DType
LAYOUT_UNSPECIFIED: Layout
LAYOUT_HND: Layout
LAYOUT_NHD: Layout
POOLING_UNSPECIFIED: Pooling
POOLING_AVG: Pooling
POOLING_MAX: Pooling
GROUP_REDUCTION_UNSPECIFIED: GroupReduction
GROUP_REDUCTION_MEAN: GroupReduction
GROUP_REDUCTION_MAX: GroupReduction
GROUP_REDUCTION_SUM: GroupReduction
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
OUTPUT_FORMAT_RAGGED: OutputFormat
OUTPUT_FORMAT_PADDED: OutputFormat
TRANSPORT_UNSPECIFIED: Transport
TRANSPORT_INLINE: Transport
TRANSPORT_CUDA_IPC: Transport
TRANSPORT_NCCL: Transport
TENSOR_KIND_UNSPECIFIED: TensorKind
TENSOR_KIND_KEYS: TensorKind
TENSOR_KIND_VALUES: TensorKind
TENSOR_KIND_QUERIES: TensorKind
TENSOR_KIND_SCORES: TensorKind
TENSOR_KIND_POSITIONS: TensorKind
TENSOR_KIND_MERGED: TensorKind
CHANNEL_DIRECTION_UNSPECIFIED: ChannelDirection
CHANNEL_DIRECTION_TO_KVCD: ChannelDirection
CHANNEL_DIRECTION_FROM_KVCD: ChannelDirection

class CacheGeometry(_message.Message):
    __slots__ = ("num_layers", "num_kv_heads", "num_query_heads", "head_dim", "dtype", "layout")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_QUERY_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_kv_heads: int
    num_query_heads: int
    head_dim: int
    dtype: DType
    layout: Layout
    def __init__(self, num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., num_query_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., layout: _Optional[_Union[Layout, str]] = ...) -> None: ...

class SequenceShape(_message.Message):
    __slots__ = ("num_tokens", "num_window_queries", "num_score_heads")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_WINDOW_QUERIES_FIELD_NUMBER: _ClassVar[int]
    NUM_SCORE_HEADS_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    num_window_queries: int
    num_score_heads: int
    def __init__(self, num_tokens: _Optional[int] = ..., num_window_queries: _Optional[int] = ..., num_score_heads: _Optional[int] = ...) -> None: ...

class SnapKvScorer(_message.Message):
    __slots__ = ("window_size", "kernel_size", "pooling", "group_reduction")
    WINDOW_SIZE_FIELD_NUMBER: _ClassVar[int]
    KERNEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    GROUP_REDUCTION_FIELD_NUMBER: _ClassVar[int]
    window_size: int
    kernel_size: int
    pooling: Pooling
    group_reduction: GroupReduction
    def __init__(self, window_size: _Optional[int] = ..., kernel_size: _Optional[int] = ..., pooling: _Optional[_Union[Pooling, str]] = ..., group_reduction: _Optional[_Union[GroupReduction, str]] = ...) -> None: ...

class KnormScorer(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamingScorer(_message.Message):
    __slots__ = ("sinks",)
    SINKS_FIELD_NUMBER: _ClassVar[int]
    sinks: int
    def __init__(self, sinks: _Optional[int] = ...) -> None: ...

class ObservedScorer(_message.Message):
    __slots__ = ("group_reduction",)
    GROUP_REDUCTION_FIELD_NUMBER: _ClassVar[int]
    group_reduction: GroupReduction
    def __init__(self, group_reduction: _Optional[_Union[GroupReduction, str]] = ...) -> None: ...

class TovaScorer(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KeyDiffScorer(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Scorer(_message.Message):
    __slots__ = ("snapkv", "knorm", "streaming", "observed", "tova", "keydiff")
    SNAPKV_FIELD_NUMBER: _ClassVar[int]
    KNORM_FIELD_NUMBER: _ClassVar[int]
    STREAMING_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    TOVA_FIELD_NUMBER: _ClassVar[int]
    KEYDIFF_FIELD_NUMBER: _ClassVar[int]
    snapkv: SnapKvScorer
    knorm: KnormScorer
    streaming: StreamingScorer
    observed: ObservedScorer
    tova: TovaScorer
    keydiff: KeyDiffScorer
    def __init__(self, snapkv: _Optional[_Union[SnapKvScorer, _Mapping]] = ..., knorm: _Optional[_Union[KnormScorer, _Mapping]] = ..., streaming: _Optional[_Union[StreamingScorer, _Mapping]] = ..., observed: _Optional[_Union[ObservedScorer, _Mapping]] = ..., tova: _Optional[_Union[TovaScorer, _Mapping]] = ..., keydiff: _Optional[_Union[KeyDiffScorer, _Mapping]] = ...) -> None: ...

class UniformLayerBudget(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PyramidLayerBudget(_message.Message):
    __slots__ = ("beta",)
    BETA_FIELD_NUMBER: _ClassVar[int]
    beta: float
    def __init__(self, beta: _Optional[float] = ...) -> None: ...

class DynamicLayerBudget(_message.Message):
    __slots__ = ("r_max", "update_interval")
    R_MAX_FIELD_NUMBER: _ClassVar[int]
    UPDATE_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    r_max: float
    update_interval: int
    def __init__(self, r_max: _Optional[float] = ..., update_interval: _Optional[int] = ...) -> None: ...

class LayerBudget(_message.Message):
    __slots__ = ("uniform", "pyramid", "dynamic")
    UNIFORM_FIELD_NUMBER: _ClassVar[int]
    PYRAMID_FIELD_NUMBER: _ClassVar[int]
    DYNAMIC_FIELD_NUMBER: _ClassVar[int]
    uniform: UniformLayerBudget
    pyramid: PyramidLayerBudget
    dynamic: DynamicLayerBudget
    def __init__(self, uniform: _Optional[_Union[UniformLayerBudget, _Mapping]] = ..., pyramid: _Optional[_Union[PyramidLayerBudget, _Mapping]] = ..., dynamic: _Optional[_Union[DynamicLayerBudget, _Mapping]] = ...) -> None: ...

class UniformHeadBudget(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdaptiveHeadBudget(_message.Message):
    __slots__ = ("alpha",)
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    alpha: float
    def __init__(self, alpha: _Optional[float] = ...) -> None: ...

class HeadBudget(_message.Message):
    __slots__ = ("uniform", "adaptive")
    UNIFORM_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    uniform: UniformHeadBudget
    adaptive: AdaptiveHeadBudget
    def __init__(self, uniform: _Optional[_Union[UniformHeadBudget, _Mapping]] = ..., adaptive: _Optional[_Union[AdaptiveHeadBudget, _Mapping]] = ...) -> None: ...

class DropReducer(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MergeSimilarReducer(_message.Message):
    __slots__ = ("similarity_threshold", "sigma", "auto_sigma", "protect_fraction", "scale_values_by_set_size")
    SIMILARITY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    AUTO_SIGMA_FIELD_NUMBER: _ClassVar[int]
    PROTECT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SCALE_VALUES_BY_SET_SIZE_FIELD_NUMBER: _ClassVar[int]
    similarity_threshold: float
    sigma: float
    auto_sigma: bool
    protect_fraction: float
    scale_values_by_set_size: bool
    def __init__(self, similarity_threshold: _Optional[float] = ..., sigma: _Optional[float] = ..., auto_sigma: bool = ..., protect_fraction: _Optional[float] = ..., scale_values_by_set_size: bool = ...) -> None: ...

class MergeNearestReducer(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Reducer(_message.Message):
    __slots__ = ("drop", "merge_similar", "merge_nearest")
    DROP_FIELD_NUMBER: _ClassVar[int]
    MERGE_SIMILAR_FIELD_NUMBER: _ClassVar[int]
    MERGE_NEAREST_FIELD_NUMBER: _ClassVar[int]
    drop: DropReducer
    merge_similar: MergeSimilarReducer
    merge_nearest: MergeNearestReducer
    def __init__(self, drop: _Optional[_Union[DropReducer, _Mapping]] = ..., merge_similar: _Optional[_Union[MergeSimilarReducer, _Mapping]] = ..., merge_nearest: _Optional[_Union[MergeNearestReducer, _Mapping]] = ...) -> None: ...

class MethodSpec(_message.Message):
    __slots__ = ("scorer", "layer_budget", "head_budget", "reducer", "keep_ratio", "keep_tokens", "skip_layers", "protect_sinks", "protect_recent")
    SCORER_FIELD_NUMBER: _ClassVar[int]
    LAYER_BUDGET_FIELD_NUMBER: _ClassVar[int]
    HEAD_BUDGET_FIELD_NUMBER: _ClassVar[int]
    REDUCER_FIELD_NUMBER: _ClassVar[int]
    KEEP_RATIO_FIELD_NUMBER: _ClassVar[int]
    KEEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SKIP_LAYERS_FIELD_NUMBER: _ClassVar[int]
    PROTECT_SINKS_FIELD_NUMBER: _ClassVar[int]
    PROTECT_RECENT_FIELD_NUMBER: _ClassVar[int]
    scorer: Scorer
    layer_budget: LayerBudget
    head_budget: HeadBudget
    reducer: Reducer
    keep_ratio: float
    keep_tokens: int
    skip_layers: _containers.RepeatedScalarFieldContainer[int]
    protect_sinks: int
    protect_recent: int
    def __init__(self, scorer: _Optional[_Union[Scorer, _Mapping]] = ..., layer_budget: _Optional[_Union[LayerBudget, _Mapping]] = ..., head_budget: _Optional[_Union[HeadBudget, _Mapping]] = ..., reducer: _Optional[_Union[Reducer, _Mapping]] = ..., keep_ratio: _Optional[float] = ..., keep_tokens: _Optional[int] = ..., skip_layers: _Optional[_Iterable[int]] = ..., protect_sinks: _Optional[int] = ..., protect_recent: _Optional[int] = ...) -> None: ...

class OutputSpec(_message.Message):
    __slots__ = ("format", "return_merged_counts")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    RETURN_MERGED_COUNTS_FIELD_NUMBER: _ClassVar[int]
    format: OutputFormat
    return_merged_counts: bool
    def __init__(self, format: _Optional[_Union[OutputFormat, str]] = ..., return_merged_counts: bool = ...) -> None: ...

class CompressHeader(_message.Message):
    __slots__ = ("request_id", "geometry", "sequences", "method", "output", "transport", "channel_id", "forward_channel_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    FORWARD_CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    geometry: CacheGeometry
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceShape]
    method: MethodSpec
    output: OutputSpec
    transport: Transport
    channel_id: str
    forward_channel_id: str
    def __init__(self, request_id: _Optional[str] = ..., geometry: _Optional[_Union[CacheGeometry, _Mapping]] = ..., sequences: _Optional[_Iterable[_Union[SequenceShape, _Mapping]]] = ..., method: _Optional[_Union[MethodSpec, _Mapping]] = ..., output: _Optional[_Union[OutputSpec, _Mapping]] = ..., transport: _Optional[_Union[Transport, str]] = ..., channel_id: _Optional[str] = ..., forward_channel_id: _Optional[str] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("sequence", "layer", "tensor", "offset", "data")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    layer: int
    tensor: TensorKind
    offset: int
    data: bytes
    def __init__(self, sequence: _Optional[int] = ..., layer: _Optional[int] = ..., tensor: _Optional[_Union[TensorKind, str]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class RegionSlice(_message.Message):
    __slots__ = ("region", "offset", "bytes")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    region: int
    offset: int
    bytes: int
    def __init__(self, region: _Optional[int] = ..., offset: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class LayerReady(_message.Message):
    __slots__ = ("sequence", "layer", "keys", "values", "queries", "scores", "output")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    layer: int
    keys: RegionSlice
    values: RegionSlice
    queries: RegionSlice
    scores: RegionSlice
    output: RegionSlice
    def __init__(self, sequence: _Optional[int] = ..., layer: _Optional[int] = ..., keys: _Optional[_Union[RegionSlice, _Mapping]] = ..., values: _Optional[_Union[RegionSlice, _Mapping]] = ..., queries: _Optional[_Union[RegionSlice, _Mapping]] = ..., scores: _Optional[_Union[RegionSlice, _Mapping]] = ..., output: _Optional[_Union[RegionSlice, _Mapping]] = ...) -> None: ...

class CompressRequest(_message.Message):
    __slots__ = ("header", "chunk", "layer_ready")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    LAYER_READY_FIELD_NUMBER: _ClassVar[int]
    header: CompressHeader
    chunk: TensorChunk
    layer_ready: LayerReady
    def __init__(self, header: _Optional[_Union[CompressHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., layer_ready: _Optional[_Union[LayerReady, _Mapping]] = ...) -> None: ...

class LayerResult(_message.Message):
    __slots__ = ("sequence", "layer", "format", "kept", "max_kept", "keys_bytes", "values_bytes", "positions_bytes", "merged_bytes", "attention_mass_kept", "in_output_region")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    MAX_KEPT_FIELD_NUMBER: _ClassVar[int]
    KEYS_BYTES_FIELD_NUMBER: _ClassVar[int]
    VALUES_BYTES_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_BYTES_FIELD_NUMBER: _ClassVar[int]
    MERGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASS_KEPT_FIELD_NUMBER: _ClassVar[int]
    IN_OUTPUT_REGION_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    layer: int
    format: OutputFormat
    kept: _containers.RepeatedScalarFieldContainer[int]
    max_kept: int
    keys_bytes: int
    values_bytes: int
    positions_bytes: int
    merged_bytes: int
    attention_mass_kept: float
    in_output_region: bool
    def __init__(self, sequence: _Optional[int] = ..., layer: _Optional[int] = ..., format: _Optional[_Union[OutputFormat, str]] = ..., kept: _Optional[_Iterable[int]] = ..., max_kept: _Optional[int] = ..., keys_bytes: _Optional[int] = ..., values_bytes: _Optional[int] = ..., positions_bytes: _Optional[int] = ..., merged_bytes: _Optional[int] = ..., attention_mass_kept: _Optional[float] = ..., in_output_region: bool = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("receive_seconds", "queue_seconds", "score_seconds", "select_seconds", "gather_seconds", "send_seconds", "total_seconds", "deferred_layers")
    RECEIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SCORE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SELECT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GATHER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SEND_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEFERRED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    receive_seconds: float
    queue_seconds: float
    score_seconds: float
    select_seconds: float
    gather_seconds: float
    send_seconds: float
    total_seconds: float
    deferred_layers: int
    def __init__(self, receive_seconds: _Optional[float] = ..., queue_seconds: _Optional[float] = ..., score_seconds: _Optional[float] = ..., select_seconds: _Optional[float] = ..., gather_seconds: _Optional[float] = ..., send_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., deferred_layers: _Optional[int] = ...) -> None: ...

class CompressSummary(_message.Message):
    __slots__ = ("request_id", "tokens_in", "tokens_kept", "bytes_in", "bytes_out", "timings", "backend", "forwarded_layers")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_IN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_KEPT_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tokens_in: int
    tokens_kept: int
    bytes_in: int
    bytes_out: int
    timings: StageTimings
    backend: str
    forwarded_layers: int
    def __init__(self, request_id: _Optional[str] = ..., tokens_in: _Optional[int] = ..., tokens_kept: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., backend: _Optional[str] = ..., forwarded_layers: _Optional[int] = ...) -> None: ...

class CompressResponse(_message.Message):
    __slots__ = ("layer_result", "result_chunk", "summary")
    LAYER_RESULT_FIELD_NUMBER: _ClassVar[int]
    RESULT_CHUNK_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    layer_result: LayerResult
    result_chunk: TensorChunk
    summary: CompressSummary
    def __init__(self, layer_result: _Optional[_Union[LayerResult, _Mapping]] = ..., result_chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., summary: _Optional[_Union[CompressSummary, _Mapping]] = ...) -> None: ...

class CudaIpcRegion(_message.Message):
    __slots__ = ("ipc_handle", "size_bytes", "device_uuid", "pci_bus_id", "device_ordinal")
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ORDINAL_FIELD_NUMBER: _ClassVar[int]
    ipc_handle: bytes
    size_bytes: int
    device_uuid: str
    pci_bus_id: str
    device_ordinal: int
    def __init__(self, ipc_handle: _Optional[bytes] = ..., size_bytes: _Optional[int] = ..., device_uuid: _Optional[str] = ..., pci_bus_id: _Optional[str] = ..., device_ordinal: _Optional[int] = ...) -> None: ...

class NcclEndpoint(_message.Message):
    __slots__ = ("unique_id", "direction")
    UNIQUE_ID_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    unique_id: bytes
    direction: ChannelDirection
    def __init__(self, unique_id: _Optional[bytes] = ..., direction: _Optional[_Union[ChannelDirection, str]] = ...) -> None: ...

class OpenChannelRequest(_message.Message):
    __slots__ = ("transport", "idle_timeout_seconds", "regions", "nccl")
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    NCCL_FIELD_NUMBER: _ClassVar[int]
    transport: Transport
    idle_timeout_seconds: int
    regions: _containers.RepeatedCompositeFieldContainer[CudaIpcRegion]
    nccl: NcclEndpoint
    def __init__(self, transport: _Optional[_Union[Transport, str]] = ..., idle_timeout_seconds: _Optional[int] = ..., regions: _Optional[_Iterable[_Union[CudaIpcRegion, _Mapping]]] = ..., nccl: _Optional[_Union[NcclEndpoint, _Mapping]] = ...) -> None: ...

class OpenChannelResponse(_message.Message):
    __slots__ = ("channel_id", "idle_timeout_seconds", "region_ids")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REGION_IDS_FIELD_NUMBER: _ClassVar[int]
    channel_id: str
    idle_timeout_seconds: int
    region_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, channel_id: _Optional[str] = ..., idle_timeout_seconds: _Optional[int] = ..., region_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class CloseChannelRequest(_message.Message):
    __slots__ = ("channel_id",)
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    channel_id: str
    def __init__(self, channel_id: _Optional[str] = ...) -> None: ...

class CloseChannelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RegisterRegionRequest(_message.Message):
    __slots__ = ("channel_id", "region")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    channel_id: str
    region: CudaIpcRegion
    def __init__(self, channel_id: _Optional[str] = ..., region: _Optional[_Union[CudaIpcRegion, _Mapping]] = ...) -> None: ...

class RegisterRegionResponse(_message.Message):
    __slots__ = ("region_id",)
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    region_id: int
    def __init__(self, region_id: _Optional[int] = ...) -> None: ...

class ReceiveForwardedRequest(_message.Message):
    __slots__ = ("channel_id",)
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    channel_id: str
    def __init__(self, channel_id: _Optional[str] = ...) -> None: ...

class ForwardedLayer(_message.Message):
    __slots__ = ("request_id", "result", "geometry", "sequence_shape", "num_sequences")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    result: LayerResult
    geometry: CacheGeometry
    sequence_shape: SequenceShape
    num_sequences: int
    def __init__(self, request_id: _Optional[str] = ..., result: _Optional[_Union[LayerResult, _Mapping]] = ..., geometry: _Optional[_Union[CacheGeometry, _Mapping]] = ..., sequence_shape: _Optional[_Union[SequenceShape, _Mapping]] = ..., num_sequences: _Optional[int] = ...) -> None: ...

class ForwardedRequestEnd(_message.Message):
    __slots__ = ("request_id", "status_code", "status_message", "forwarded_layers")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    status_code: int
    status_message: str
    forwarded_layers: int
    def __init__(self, request_id: _Optional[str] = ..., status_code: _Optional[int] = ..., status_message: _Optional[str] = ..., forwarded_layers: _Optional[int] = ...) -> None: ...

class ForwardNotice(_message.Message):
    __slots__ = ("layer", "end")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    layer: ForwardedLayer
    end: ForwardedRequestEnd
    def __init__(self, layer: _Optional[_Union[ForwardedLayer, _Mapping]] = ..., end: _Optional[_Union[ForwardedRequestEnd, _Mapping]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MethodParameter(_message.Message):
    __slots__ = ("name", "type", "default_value", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default_value: str
    description: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default_value: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class MethodInfo(_message.Message):
    __slots__ = ("name", "stage", "implemented", "description", "parameters", "backends")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    IMPLEMENTED_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    stage: str
    implemented: bool
    description: str
    parameters: _containers.RepeatedCompositeFieldContainer[MethodParameter]
    backends: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., stage: _Optional[str] = ..., implemented: bool = ..., description: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[MethodParameter, _Mapping]]] = ..., backends: _Optional[_Iterable[str]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_request_bytes", "max_tokens", "max_layers", "max_sequences", "max_concurrent_streams", "max_chunk_bytes")
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_request_bytes: int
    max_tokens: int
    max_layers: int
    max_sequences: int
    max_concurrent_streams: int
    max_chunk_bytes: int
    def __init__(self, max_request_bytes: _Optional[int] = ..., max_tokens: _Optional[int] = ..., max_layers: _Optional[int] = ..., max_sequences: _Optional[int] = ..., max_concurrent_streams: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("name", "memory_bytes", "backend", "ordinal", "compute_capability", "memory_budget_bytes", "memory_in_use_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ORDINAL_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_IN_USE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    memory_bytes: int
    backend: str
    ordinal: int
    compute_capability: str
    memory_budget_bytes: int
    memory_in_use_bytes: int
    def __init__(self, name: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., backend: _Optional[str] = ..., ordinal: _Optional[int] = ..., compute_capability: _Optional[str] = ..., memory_budget_bytes: _Optional[int] = ..., memory_in_use_bytes: _Optional[int] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "backend", "methods", "dtypes", "layouts", "transports", "devices", "limits", "worker_threads", "backends")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    LAYOUTS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    WORKER_THREADS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    version: str
    backend: str
    methods: _containers.RepeatedCompositeFieldContainer[MethodInfo]
    dtypes: _containers.RepeatedScalarFieldContainer[DType]
    layouts: _containers.RepeatedScalarFieldContainer[Layout]
    transports: _containers.RepeatedScalarFieldContainer[Transport]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    limits: Limits
    worker_threads: int
    backends: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[str] = ..., backend: _Optional[str] = ..., methods: _Optional[_Iterable[_Union[MethodInfo, _Mapping]]] = ..., dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., layouts: _Optional[_Iterable[_Union[Layout, str]]] = ..., transports: _Optional[_Iterable[_Union[Transport, str]]] = ..., devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., worker_threads: _Optional[int] = ..., backends: _Optional[_Iterable[str]] = ...) -> None: ...
