#include "tests/integration/raw_stream.h"

#include <chrono>
#include <cstring>
#include <random>

namespace kvcompress::testing {
namespace {

size_t ElementSize(v1::DType dtype) { return dtype == v1::DTYPE_FLOAT32 ? 4 : 2; }

// Fixed-seed normal values encoded in `dtype` (bf16 by truncation is fine for test data).
std::string RandomTensorBytes(size_t elements, v1::DType dtype, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::string bytes(elements * ElementSize(dtype), '\0');
  for (size_t i = 0; i < elements; ++i) {
    const float value = normal(rng);
    uint32_t bits;
    std::memcpy(&bits, &value, 4);
    if (dtype == v1::DTYPE_FLOAT32) {
      std::memcpy(&bytes[i * 4], &value, 4);
    } else {
      // bf16: top half of the float; fp16 is not used by these helpers.
      const uint16_t half = static_cast<uint16_t>(bits >> 16);
      std::memcpy(&bytes[i * 2], &half, 2);
    }
  }
  return bytes;
}

}  // namespace

int StreamOutcome::layer_results() const {
  int count = 0;
  for (const auto& response : responses) count += response.has_layer_result();
  return count;
}

bool StreamOutcome::has_summary() const {
  return !responses.empty() && responses.back().has_summary();
}

v1::CompressHeader SmallHeader() {
  v1::CompressHeader header;
  header.set_request_id("integration");
  auto* geometry = header.mutable_geometry();
  geometry->set_num_layers(2);
  geometry->set_num_kv_heads(2);
  geometry->set_num_query_heads(4);
  geometry->set_head_dim(16);
  geometry->set_dtype(v1::DTYPE_BFLOAT16);
  geometry->set_layout(v1::LAYOUT_HND);
  auto* sequence = header.add_sequences();
  sequence->set_num_tokens(100);
  sequence->set_num_window_queries(8);
  header.mutable_method()->mutable_scorer()->mutable_snapkv();
  header.mutable_method()->set_keep_ratio(0.5);
  return header;
}

std::vector<v1::TensorChunk> ChunksFor(const v1::CompressHeader& header, uint32_t seed) {
  std::mt19937 rng(seed);
  const auto& g = header.geometry();
  std::vector<v1::TensorChunk> chunks;
  for (int s = 0; s < header.sequences_size(); ++s) {
    const auto& sequence = header.sequences(s);
    for (uint32_t layer = 0; layer < g.num_layers(); ++layer) {
      auto add = [&](v1::TensorKind kind, std::string data) {
        v1::TensorChunk chunk;
        chunk.set_sequence(s);
        chunk.set_layer(layer);
        chunk.set_tensor(kind);
        chunk.set_offset(0);
        chunk.set_data(std::move(data));
        chunks.push_back(std::move(chunk));
      };
      const size_t kv = size_t{g.num_kv_heads()} * sequence.num_tokens() * g.head_dim();
      add(v1::TENSOR_KIND_KEYS, RandomTensorBytes(kv, g.dtype(), rng));
      add(v1::TENSOR_KIND_VALUES, RandomTensorBytes(kv, g.dtype(), rng));
      if (sequence.num_window_queries() > 0) {
        const size_t q =
            size_t{g.num_query_heads()} * sequence.num_window_queries() * g.head_dim();
        add(v1::TENSOR_KIND_QUERIES, RandomTensorBytes(q, g.dtype(), rng));
      }
      if (sequence.num_score_heads() > 0) {
        add(v1::TENSOR_KIND_SCORES, RandomTensorBytes(size_t{sequence.num_score_heads()} *
                                                          sequence.num_tokens(),
                                                      v1::DTYPE_FLOAT32, rng));
      }
    }
  }
  return chunks;
}

v1::CompressRequest HeaderRequest(const v1::CompressHeader& header) {
  v1::CompressRequest request;
  *request.mutable_header() = header;
  return request;
}

v1::CompressRequest ChunkRequest(const v1::TensorChunk& chunk) {
  v1::CompressRequest request;
  *request.mutable_chunk() = chunk;
  return request;
}

std::vector<v1::CompressRequest> ValidRequests(const v1::CompressHeader& header) {
  std::vector<v1::CompressRequest> requests = {HeaderRequest(header)};
  for (const auto& chunk : ChunksFor(header)) requests.push_back(ChunkRequest(chunk));
  return requests;
}

StreamOutcome RunStream(v1::KvCompress::Stub& stub, const std::vector<v1::CompressRequest>& requests,
                        double deadline_seconds) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(deadline_seconds * 1000)));
  auto stream = stub.Compress(&context);
  for (const auto& request : requests) {
    if (!stream->Write(request)) break;  // the server already finished the call
  }
  stream->WritesDone();
  StreamOutcome outcome;
  v1::CompressResponse response;
  while (stream->Read(&response)) outcome.responses.push_back(response);
  outcome.status = stream->Finish();
  return outcome;
}

}  // namespace kvcompress::testing
