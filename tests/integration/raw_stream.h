// Raw-stub helpers for integration tests that need to send streams the SDK would never
// produce (malformed ones), plus a small valid request to check that the server still
// serves after each bad one.
#ifndef KVCOMPRESS_TESTS_INTEGRATION_RAW_STREAM_H_
#define KVCOMPRESS_TESTS_INTEGRATION_RAW_STREAM_H_

#include <cstdint>
#include <string>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "kvcompress/v1/kvcompress.grpc.pb.h"

namespace kvcompress::testing {

// What came back from one Compress stream.
struct StreamOutcome {
  grpc::Status status;
  std::vector<v1::CompressResponse> responses;
  int layer_results() const;
  bool has_summary() const;
};

// A small valid request: 2 layers, 2 KV heads, 4 query heads, head_dim 16, bf16, HND,
// one sequence of 100 tokens with 8 window queries, snapkv keep 0.5. Tensor bytes are
// drawn from a fixed-seed normal distribution.
v1::CompressHeader SmallHeader();

// The chunks (one per tensor) carrying fixed-seed random data for every layer of `header`.
std::vector<v1::TensorChunk> ChunksFor(const v1::CompressHeader& header, uint32_t seed = 7);

// Sends `requests` in order, half-closes, reads every response and returns the outcome.
// `deadline_seconds` bounds the whole call.
StreamOutcome RunStream(v1::KvCompress::Stub& stub, const std::vector<v1::CompressRequest>& requests,
                        double deadline_seconds = 30);

// Header followed by its chunks.
std::vector<v1::CompressRequest> ValidRequests(const v1::CompressHeader& header);

v1::CompressRequest HeaderRequest(const v1::CompressHeader& header);
v1::CompressRequest ChunkRequest(const v1::TensorChunk& chunk);

}  // namespace kvcompress::testing

#endif  // KVCOMPRESS_TESTS_INTEGRATION_RAW_STREAM_H_
