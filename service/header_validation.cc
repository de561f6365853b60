#include "service/header_validation.h"

#include <atomic>
#include <limits>
#include <random>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/status_macros.h"
#include "service/spec_conversion.h"

namespace kvcompress {
namespace {

absl::Status ValidateSequences(const v1::CompressHeader& header, const CacheGeometry& geometry,
                               std::vector<SequenceShape>& sequences) {
  if (header.sequences_size() == 0) {
    return absl::InvalidArgumentError(
        "sequences: empty; a Compress header declares at least one sequence");
  }
  sequences.reserve(header.sequences_size());
  for (int i = 0; i < header.sequences_size(); ++i) {
    const v1::SequenceShape& shape = header.sequences(i);
    const std::string field = absl::StrCat("sequences[", i, "]");
    if (shape.num_tokens() == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".num_tokens: 0; expected at least 1 cached token"));
    }
    if (shape.num_window_queries() > shape.num_tokens()) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".num_window_queries: ", shape.num_window_queries(), " exceeds num_tokens ",
          shape.num_tokens(), "; the window is the last W tokens"));
    }
    const uint32_t score_heads = shape.num_score_heads();
    if (score_heads != 0 && score_heads != static_cast<uint32_t>(geometry.num_kv_heads) &&
        score_heads != static_cast<uint32_t>(geometry.num_query_heads)) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".num_score_heads: ", score_heads, "; expected 0, num_kv_heads (",
          geometry.num_kv_heads, ") or num_query_heads (", geometry.num_query_heads, ")"));
    }
    sequences.push_back(SequenceShapeFromProto(shape));
  }
  return absl::OkStatus();
}

absl::Status ValidateTransport(v1::Transport transport) {
  switch (transport) {
    case v1::TRANSPORT_UNSPECIFIED:
    case v1::TRANSPORT_INLINE:
      return absl::OkStatus();
    case v1::TRANSPORT_CUDA_IPC:
    case v1::TRANSPORT_NCCL:
      // The stream's channel (and whether the transport is built and enabled) is checked when
      // the reactor leases it (service/channel_rpcs.h).
      return absl::OkStatus();
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("transport: unknown value ", static_cast<int>(transport),
                       "; expected TRANSPORT_INLINE, TRANSPORT_CUDA_IPC or TRANSPORT_NCCL"));
  }
}

absl::Status CheckLimits(const CacheGeometry& geometry, const std::vector<SequenceShape>& sequences,
                         const ServerLimits& limits, uint64_t request_bytes) {
  if (sequences.size() > limits.max_sequences) {
    return absl::ResourceExhaustedError(absl::StrCat("sequences: ", sequences.size(),
                                                     " sequences exceed the server limit of ",
                                                     limits.max_sequences, " (--max_sequences)"));
  }
  if (static_cast<uint64_t>(geometry.num_layers) > limits.max_layers) {
    return absl::ResourceExhaustedError(absl::StrCat("geometry.num_layers: ", geometry.num_layers,
                                                     " layers exceed the server limit of ",
                                                     limits.max_layers, " (--max_layers)"));
  }
  for (size_t i = 0; i < sequences.size(); ++i) {
    if (static_cast<uint64_t>(sequences[i].num_tokens) > limits.max_tokens) {
      return absl::ResourceExhaustedError(
          absl::StrCat("sequences[", i, "].num_tokens: ", sequences[i].num_tokens,
                       " tokens exceed the server limit of ", limits.max_tokens,
                       " per sequence (--max_tokens)"));
    }
  }
  if (request_bytes > limits.max_request_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "request: the header announces ", request_bytes, " tensor bytes (", sequences.size(),
        " sequences x ", geometry.num_layers, " layers); the server limit is ",
        limits.max_request_bytes, " bytes (--max_request_bytes)"));
  }
  return absl::OkStatus();
}

}  // namespace

std::string GenerateRequestId() {
  static const uint32_t process_tag = std::random_device{}();
  static std::atomic<uint64_t> counter{0};
  return absl::StrFormat("kvcd-%08x-%d", process_tag, counter.fetch_add(1) + 1);
}

uint64_t RequestTensorBytes(const CacheGeometry& geometry,
                            const std::vector<SequenceShape>& sequences) {
  using u128 = unsigned __int128;
  const u128 dtype_size = DTypeSize(geometry.dtype);
  u128 per_layer = 0;
  for (const SequenceShape& shape : sequences) {
    const u128 tokens = static_cast<u128>(shape.num_tokens);
    per_layer +=
        2 * static_cast<u128>(geometry.num_kv_heads) * tokens * geometry.head_dim * dtype_size;
    per_layer += static_cast<u128>(geometry.num_query_heads) * shape.num_window_queries *
                 geometry.head_dim * dtype_size;
    per_layer += static_cast<u128>(shape.num_score_heads) * tokens * sizeof(float);
  }
  const u128 total = per_layer * static_cast<u128>(geometry.num_layers);
  return total > std::numeric_limits<uint64_t>::max() ? std::numeric_limits<uint64_t>::max()
                                                      : static_cast<uint64_t>(total);
}

absl::StatusOr<ValidatedHeader> ValidateHeader(const v1::CompressRequest& request,
                                               const ServerLimits& limits,
                                               const BackendRouter& backends) {
  if (request.payload_case() != v1::CompressRequest::kHeader) {
    return absl::InvalidArgumentError(absl::StrCat(
        "first message: expected the header (CompressRequest.header), got ",
        request.payload_case() == v1::CompressRequest::kChunk ? "a chunk" : "an empty message",
        "; a Compress stream starts with exactly one header"));
  }
  const v1::CompressHeader& header = request.header();
  ValidatedHeader result;
  if (header.request_id().size() > kMaxRequestIdBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("request_id: ", header.request_id().size(), " bytes; expected at most ",
                     kMaxRequestIdBytes, " (it is echoed in summaries, errors and logs)"));
  }
  result.request_id = header.request_id().empty() ? GenerateRequestId() : header.request_id();
  KVC_ASSIGN_OR_RETURN(result.geometry, GeometryFromProto(header.geometry()));
  KVC_RETURN_IF_ERROR(ValidateSequences(header, result.geometry, result.sequences));
  KVC_RETURN_IF_ERROR(ValidateTransport(header.transport()));

  switch (header.output().format()) {
    case v1::OUTPUT_FORMAT_UNSPECIFIED:
    case v1::OUTPUT_FORMAT_RAGGED:
      result.padded_output = false;
      break;
    case v1::OUTPUT_FORMAT_PADDED:
      result.padded_output = true;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("output.format: unknown value ", static_cast<int>(header.output().format()),
                       "; expected OUTPUT_FORMAT_RAGGED or OUTPUT_FORMAT_PADDED"));
  }
  result.return_merged_counts = header.output().return_merged_counts();

  result.request_bytes = RequestTensorBytes(result.geometry, result.sequences);
  KVC_RETURN_IF_ERROR(CheckLimits(result.geometry, result.sequences, limits, result.request_bytes));

  KVC_ASSIGN_OR_RETURN(result.spec, MethodSpecFromProto(header.method()));
  KVC_ASSIGN_OR_RETURN(BackendRoute route, backends.Choose(result.spec, result.geometry.head_dim));
  result.backend = route.backend;
  result.backend_passed_over = std::move(route.passed_over);
  KVC_ASSIGN_OR_RETURN(result.pipeline, CompressionPipeline::Create(result.backend, result.geometry,
                                                                    result.spec, result.sequences));
  return result;
}

}  // namespace kvcompress
