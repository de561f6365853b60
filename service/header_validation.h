// Validation of a Compress stream's first message, at the edge: everything the header
// announces is checked before a single tensor byte is accepted.
//
// Order of checks: the message is a header; geometry (GeometryFromProto); at least one
// sequence, each with num_tokens ≥ 1, num_window_queries ≤ num_tokens and num_score_heads
// in {0, H_kv, H_q}; transport (inline, or cuda_ipc / nccl, whose channel the reactor checks);
// output format; server limits (sequences, layers, tokens per sequence, total tensor bytes);
// the method (MethodSpecFromProto, then CompressionPipeline::Create, which checks it against
// the geometry and every sequence).
//
// Errors: INVALID_ARGUMENT naming the field, the value and what was expected;
// RESOURCE_EXHAUSTED with the number and the limit (and the flag that sets it);
// UNIMPLEMENTED for methods or transports this build cannot run. Thread-safe.
#ifndef KVCOMPRESS_SERVICE_HEADER_VALIDATION_H_
#define KVCOMPRESS_SERVICE_HEADER_VALIDATION_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "kernels/cache_geometry.h"
#include "kernels/compression_pipeline.h"
#include "kernels/method_spec.h"
#include "kvcompress/v1/kvcompress.pb.h"
#include "service/backend_router.h"
#include "service/server_limits.h"

namespace kvcompress {

// What a valid header decides for the rest of the stream.
struct ValidatedHeader {
  std::string request_id;  // the client's, or a generated "kvcd-…" one
  CacheGeometry geometry;
  std::vector<SequenceShape> sequences;
  MethodSpec spec;
  bool padded_output = false;  // OUTPUT_FORMAT_PADDED
  bool return_merged_counts = false;
  uint64_t request_bytes = 0;  // tensor bytes the stream will carry
  // The backend that compresses this request, and why the preferred one did not (OK when it
  // did).
  Backend* backend = nullptr;
  absl::Status backend_passed_over;
  std::unique_ptr<CompressionPipeline> pipeline;
};

// Validates `request` as the first message of a stream, picks its backend with `backends`
// and creates its pipeline there (the router must outlive the pipeline).
absl::StatusOr<ValidatedHeader> ValidateHeader(const v1::CompressRequest& request,
                                               const ServerLimits& limits,
                                               const BackendRouter& backends);

// A fresh request id, "kvcd-<process tag>-<counter>", for requests that name none.
std::string GenerateRequestId();

// The longest request_id a header may carry: it is echoed in summaries, errors and logs.
inline constexpr size_t kMaxRequestIdBytes = 256;

// Tensor bytes one stream carries for `sequences` (keys, values, queries and scores of every
// layer), saturating at UINT64_MAX instead of overflowing.
uint64_t RequestTensorBytes(const CacheGeometry& geometry,
                            const std::vector<SequenceShape>& sequences);

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_HEADER_VALIDATION_H_
