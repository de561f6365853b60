#include "service/stream_assembler.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvcompress {
namespace {

using ::testing::HasSubstr;

// Two sequences: seq 0 sends window queries (W = 4), seq 1 sends per-query-head scores.
CacheGeometry SmallGeometry() {
  CacheGeometry geometry;
  geometry.num_layers = 3;
  geometry.num_kv_heads = 2;
  geometry.num_query_heads = 4;
  geometry.head_dim = 8;
  geometry.dtype = DType::kBFloat16;
  geometry.layout = Layout::kHND;
  return geometry;
}

std::vector<SequenceShape> SmallSequences() {
  return {SequenceShape{100, 4, 0}, SequenceShape{37, 0, 4}};
}

v1::TensorChunk Chunk(uint32_t sequence, uint32_t layer, v1::TensorKind kind, uint64_t offset,
                      std::string data) {
  v1::TensorChunk chunk;
  chunk.set_sequence(sequence);
  chunk.set_layer(layer);
  chunk.set_tensor(kind);
  chunk.set_offset(offset);
  chunk.set_data(std::move(data));
  return chunk;
}

std::string Bytes(size_t size, char fill = 'x') { return std::string(size, fill); }

// Bytes of one tensor of the small geometry.
size_t SmallTensorBytes(int sequence, v1::TensorKind kind) {
  const CacheGeometry geometry = SmallGeometry();
  const SequenceShape shape = SmallSequences()[sequence];
  switch (kind) {
    case v1::TENSOR_KIND_KEYS:
    case v1::TENSOR_KIND_VALUES:
      return geometry.KeyValueBytes(shape.num_tokens);
    case v1::TENSOR_KIND_QUERIES:
      return geometry.QueryBytes(shape.num_window_queries);
    case v1::TENSOR_KIND_SCORES:
      return CacheGeometry::ScoreBytes(shape.num_score_heads, shape.num_tokens);
    default:
      return 0;
  }
}

class StreamAssemblerTest : public ::testing::Test {
 protected:
  StreamAssembler assembler_{SmallGeometry(), SmallSequences(), nullptr};

  // Feeds a chunk that must be accepted without completing a layer.
  void FeedPartial(const v1::TensorChunk& chunk) {
    auto result = assembler_.AddChunk(chunk);
    ASSERT_TRUE(result.ok()) << result.status();
    ASSERT_FALSE(result->has_value());
  }

  // Sends layer (sequence, layer) whole, one chunk per tensor; returns the completed layer.
  std::optional<AssembledLayer> FeedWholeLayer(uint32_t sequence, uint32_t layer) {
    std::vector<v1::TensorKind> kinds = {v1::TENSOR_KIND_KEYS, v1::TENSOR_KIND_VALUES};
    if (sequence == 0) kinds.push_back(v1::TENSOR_KIND_QUERIES);
    if (sequence == 1) kinds.push_back(v1::TENSOR_KIND_SCORES);
    std::optional<AssembledLayer> done;
    for (v1::TensorKind kind : kinds) {
      auto result = assembler_.AddChunk(
          Chunk(sequence, layer, kind, 0, Bytes(SmallTensorBytes(sequence, kind))));
      EXPECT_TRUE(result.ok()) << result.status();
      if (result.ok() && result->has_value()) done = std::move(**result);
    }
    return done;
  }

  void ExpectError(const v1::TensorChunk& chunk, absl::StatusCode code,
                   const std::string& message_part) {
    auto result = assembler_.AddChunk(chunk);
    ASSERT_FALSE(result.ok());
    EXPECT_EQ(result.status().code(), code) << result.status();
    EXPECT_THAT(std::string(result.status().message()), HasSubstr(message_part));
  }
};

TEST_F(StreamAssemblerTest, SequenceOutOfRange) {
  ExpectError(Chunk(2, 0, v1::TENSOR_KIND_KEYS, 0, Bytes(16)), absl::StatusCode::kInvalidArgument,
              "chunk sequence 2 out of range: the header declares 2 sequences");
}

TEST_F(StreamAssemblerTest, LayerOutOfRange) {
  ExpectError(Chunk(0, 3, v1::TENSOR_KIND_KEYS, 0, Bytes(16)), absl::StatusCode::kInvalidArgument,
              "chunk layer 3 out of range: geometry.num_layers is 3");
}

TEST_F(StreamAssemblerTest, QueriesWithoutWindow) {
  ExpectError(Chunk(1, 0, v1::TENSOR_KIND_QUERIES, 0, Bytes(16)),
              absl::StatusCode::kInvalidArgument,
              "sequence 1 layer 0: queries chunk, but the header declares num_window_queries 0");
}

TEST_F(StreamAssemblerTest, ScoresWithoutScoreHeads) {
  ExpectError(Chunk(0, 1, v1::TENSOR_KIND_SCORES, 0, Bytes(16)), absl::StatusCode::kInvalidArgument,
              "sequence 0 layer 1: scores chunk, but the header declares num_score_heads 0");
}

TEST_F(StreamAssemblerTest, ResultOnlyAndUnknownTensorKinds) {
  ExpectError(Chunk(0, 0, v1::TENSOR_KIND_POSITIONS, 0, Bytes(16)),
              absl::StatusCode::kInvalidArgument, "tensor TENSOR_KIND_POSITIONS is result-only");
  ExpectError(Chunk(0, 0, v1::TENSOR_KIND_MERGED, 0, Bytes(16)), absl::StatusCode::kInvalidArgument,
              "tensor TENSOR_KIND_MERGED is result-only");
  ExpectError(Chunk(0, 0, v1::TENSOR_KIND_UNSPECIFIED, 0, Bytes(16)),
              absl::StatusCode::kInvalidArgument, "sequence 0 layer 0: tensor not set");
  ExpectError(Chunk(0, 0, static_cast<v1::TensorKind>(42), 0, Bytes(16)),
              absl::StatusCode::kInvalidArgument, "tensor has unknown kind 42");
}

TEST_F(StreamAssemblerTest, EmptyChunk) {
  ExpectError(Chunk(0, 0, v1::TENSOR_KIND_KEYS, 0, ""), absl::StatusCode::kInvalidArgument,
              "sequence 0 layer 0 keys: empty chunk at offset 0; expected 1 to 4193280 bytes");
}

TEST_F(StreamAssemblerTest, GapInOffsets) {
  FeedPartial(Chunk(0, 0, v1::TENSOR_KIND_KEYS, 0, Bytes(1024)));
  ExpectError(Chunk(0, 0, v1::TENSOR_KIND_KEYS, 1026, Bytes(16)),
              absl::StatusCode::kInvalidArgument,
              "sequence 0 layer 0 keys: chunk offset 1026 but 1024 bytes were received so far");
}

TEST_F(StreamAssemblerTest, FirstChunkNotAtOffsetZero) {
  ExpectError(Chunk(0, 2, v1::TENSOR_KIND_VALUES, 512, Bytes(16)),
              absl::StatusCode::kInvalidArgument,
              "sequence 0 layer 2 values: chunk offset 512 but 0 bytes were received so far");
}

TEST_F(StreamAssemblerTest, ReorderedChunks) {
  FeedPartial(Chunk(0, 0, v1::TENSOR_KIND_KEYS, 0, Bytes(100)));
  // The third piece arrives before the second.
  ExpectError(Chunk(0, 0, v1::TENSOR_KIND_KEYS, 200, Bytes(100)),
              absl::StatusCode::kInvalidArgument, "chunk offset 200 but 100 bytes");
}

TEST_F(StreamAssemblerTest, DuplicateChunk) {
  FeedPartial(Chunk(0, 0, v1::TENSOR_KIND_KEYS, 0, Bytes(100)));
  ExpectError(Chunk(0, 0, v1::TENSOR_KIND_KEYS, 0, Bytes(100)), absl::StatusCode::kInvalidArgument,
              "chunk offset 0 but 100 bytes were received so far; the chunks of a tensor arrive "
              "in order, without gaps or repeats");
}

TEST_F(StreamAssemblerTest, ResentTensorAfterItCompleted) {
  const size_t bytes = SmallTensorBytes(0, v1::TENSOR_KIND_KEYS);
  FeedPartial(Chunk(0, 0, v1::TENSOR_KIND_KEYS, 0, Bytes(bytes)));
  ExpectError(Chunk(0, 0, v1::TENSOR_KIND_KEYS, 0, Bytes(bytes)),
              absl::StatusCode::kInvalidArgument,
              "sequence 0 layer 0 keys: chunk at offset 0 after the tensor was complete "
              "(2*100*8 bfloat16 elements (3200 bytes))");
}

TEST_F(StreamAssemblerTest, ChunkPastTheEndOfTheTensor) {
  FeedPartial(Chunk(1, 2, v1::TENSOR_KIND_SCORES, 0, Bytes(500)));
  ExpectError(Chunk(1, 2, v1::TENSOR_KIND_SCORES, 500, Bytes(100)),
              absl::StatusCode::kInvalidArgument,
              "sequence 1 layer 2 scores: chunk ends at byte 600 but the tensor holds 4*37 "
              "float32 elements (592 bytes)");
}

TEST_F(StreamAssemblerTest, ChunkAfterLayerComplete) {
  ASSERT_TRUE(FeedWholeLayer(0, 1).has_value());
  ExpectError(Chunk(0, 1, v1::TENSOR_KIND_VALUES, 0, Bytes(16)), absl::StatusCode::kInvalidArgument,
              "sequence 0 layer 1 values: chunk at offset 0 arrived after the layer was complete");
}

TEST_F(StreamAssemblerTest, SecondHeaderAndEmptyRequest) {
  v1::CompressRequest header;
  header.mutable_header()->set_request_id("again");
  auto second = assembler_.AddRequest(header);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(second.status().message()),
              HasSubstr("second header: a Compress stream carries exactly one header"));

  auto empty = assembler_.AddRequest(v1::CompressRequest());
  ASSERT_FALSE(empty.ok());
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(empty.status().message()), HasSubstr("empty CompressRequest"));
}

TEST_F(StreamAssemblerTest, AddRequestForwardsChunks) {
  v1::CompressRequest request;
  *request.mutable_chunk() = Chunk(0, 0, v1::TENSOR_KIND_KEYS, 0, Bytes(64));
  auto result = assembler_.AddRequest(request);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_FALSE(result->has_value());
  EXPECT_EQ(assembler_.bytes_received(), 64u);
}

TEST_F(StreamAssemblerTest, LayerWaitsForQueriesAndScores) {
  const size_t kv0 = SmallTensorBytes(0, v1::TENSOR_KIND_KEYS);
  FeedPartial(Chunk(0, 0, v1::TENSOR_KIND_KEYS, 0, Bytes(kv0)));
  FeedPartial(Chunk(0, 0, v1::TENSOR_KIND_VALUES, 0, Bytes(kv0)));
  auto done = assembler_.AddChunk(
      Chunk(0, 0, v1::TENSOR_KIND_QUERIES, 0, Bytes(SmallTensorBytes(0, v1::TENSOR_KIND_QUERIES))));
  ASSERT_TRUE(done.ok()) << done.status();
  ASSERT_TRUE(done->has_value());
  EXPECT_EQ((*done)->input.queries.size(), SmallTensorBytes(0, v1::TENSOR_KIND_QUERIES));

  const size_t kv1 = SmallTensorBytes(1, v1::TENSOR_KIND_KEYS);
  FeedPartial(Chunk(1, 0, v1::TENSOR_KIND_KEYS, 0, Bytes(kv1)));
  FeedPartial(Chunk(1, 0, v1::TENSOR_KIND_VALUES, 0, Bytes(kv1)));
  done = assembler_.AddChunk(
      Chunk(1, 0, v1::TENSOR_KIND_SCORES, 0, Bytes(SmallTensorBytes(1, v1::TENSOR_KIND_SCORES))));
  ASSERT_TRUE(done.ok()) << done.status();
  ASSERT_TRUE(done->has_value());
  EXPECT_EQ((*done)->input.scores.size(), 4u * 37u);
  EXPECT_TRUE((*done)->input.queries.empty());
}

TEST_F(StreamAssemblerTest, HalfCloseListsMissingTensors) {
  ASSERT_TRUE(FeedWholeLayer(0, 0).has_value());
  FeedPartial(Chunk(0, 1, v1::TENSOR_KIND_KEYS, 0, Bytes(1000)));
  const absl::Status status = assembler_.CheckComplete();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()),
              HasSubstr("stream ended before sequence 0 layer 1 keys (received 1000 of 3200 "
                        "bytes), sequence 0 layer 1 values (received 0 of 3200 bytes), sequence 0 "
                        "layer 1 queries (received 0 of 256 bytes), sequence 0 layer 2 keys "
                        "(received 0 of 3200 bytes), and 11 more incomplete tensors"));
}

TEST_F(StreamAssemblerTest, HalfCloseOkWhenEverythingArrived) {
  for (uint32_t sequence = 0; sequence < 2; ++sequence) {
    for (uint32_t layer = 0; layer < 3; ++layer) {
      ASSERT_TRUE(FeedWholeLayer(sequence, layer).has_value());
    }
  }
  EXPECT_TRUE(assembler_.CheckComplete().ok());
  EXPECT_EQ(assembler_.layers_completed(), 6);
  EXPECT_EQ(assembler_.bytes_buffered(), 0u);
  EXPECT_EQ(assembler_.bytes_received(), assembler_.bytes_expected());
}

// The example of the error-message convention: an 8*4096*128 bf16 tensor overrun by 92 bytes.
TEST(StreamAssemblerLargeTest, OverrunAndOversizedChunkMessages) {
  CacheGeometry geometry;
  geometry.num_layers = 4;
  geometry.num_kv_heads = 8;
  geometry.num_query_heads = 8;
  geometry.head_dim = 128;
  geometry.dtype = DType::kBFloat16;
  StreamAssembler assembler(geometry, {SequenceShape{4096, 0, 0}}, nullptr);

  auto oversized =
      assembler.AddChunk(Chunk(0, 3, v1::TENSOR_KIND_KEYS, 0, Bytes(kMaxChunkDataBytes + 1)));
  ASSERT_FALSE(oversized.ok());
  EXPECT_EQ(oversized.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(oversized.status().message()),
              HasSubstr("sequence 0 layer 3 keys: chunk holds 4193281 bytes of data; at most "
                        "4193280 bytes"));

  StreamAssembler fresh(geometry, {SequenceShape{4096, 0, 0}}, nullptr);
  for (uint64_t offset : {uint64_t{0}, uint64_t{kMaxChunkDataBytes}}) {
    auto ok = fresh.AddChunk(Chunk(0, 3, v1::TENSOR_KIND_KEYS, offset, Bytes(kMaxChunkDataBytes)));
    ASSERT_TRUE(ok.ok()) << ok.status();
  }
  auto overrun =
      fresh.AddChunk(Chunk(0, 3, v1::TENSOR_KIND_KEYS, 2 * kMaxChunkDataBytes, Bytes(2140)));
  ASSERT_FALSE(overrun.ok());
  EXPECT_EQ(overrun.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(overrun.status().message(),
            "sequence 0 layer 3 keys: chunk ends at byte 8388700 but the tensor holds "
            "8*4096*128 bfloat16 elements (8388608 bytes)");
}

TEST(StreamAssemblerLayoutTest, NhdTensorsDescribeTokensFirst) {
  CacheGeometry geometry = SmallGeometry();
  geometry.layout = Layout::kNHD;
  geometry.dtype = DType::kFloat32;
  StreamAssembler assembler(geometry, {SequenceShape{10, 0, 0}}, nullptr);
  auto overrun = assembler.AddChunk(Chunk(0, 0, v1::TENSOR_KIND_VALUES, 0, Bytes(641)));
  ASSERT_FALSE(overrun.ok());
  EXPECT_THAT(std::string(overrun.status().message()),
              HasSubstr("the tensor holds 10*2*8 float32 elements (640 bytes)"));
}

TEST(StreamAssemblerMemoryTest, BuffersCountAgainstTheBudgetUntilReleased) {
  const CacheGeometry geometry = SmallGeometry();
  const size_t kv = geometry.KeyValueBytes(100);
  const size_t queries = geometry.QueryBytes(4);
  MemoryBudget budget(0);
  StreamAssembler assembler(geometry, {SequenceShape{100, 4, 0}}, &budget);
  // The whole tensor is reserved on its first chunk.
  ASSERT_TRUE(assembler.AddChunk(Chunk(0, 0, v1::TENSOR_KIND_KEYS, 0, Bytes(10))).ok());
  EXPECT_EQ(budget.in_use_bytes(), kv);
  EXPECT_EQ(assembler.bytes_buffered(), kv);
  ASSERT_TRUE(assembler.AddChunk(Chunk(0, 0, v1::TENSOR_KIND_KEYS, 10, Bytes(kv - 10))).ok());
  ASSERT_TRUE(assembler.AddChunk(Chunk(0, 0, v1::TENSOR_KIND_VALUES, 0, Bytes(kv))).ok());
  auto done = assembler.AddChunk(Chunk(0, 0, v1::TENSOR_KIND_QUERIES, 0, Bytes(queries)));
  ASSERT_TRUE(done.ok()) << done.status();
  ASSERT_TRUE(done->has_value());
  EXPECT_EQ(assembler.bytes_buffered(), 0u);
  // The reservation travels with the layer.
  EXPECT_EQ((*done)->reservation.bytes(), 2 * kv + queries);
  EXPECT_EQ(budget.in_use_bytes(), 2 * kv + queries);
  done->reset();
  EXPECT_EQ(budget.in_use_bytes(), 0u);
}

TEST(StreamAssemblerMemoryTest, ExhaustedBudgetIsResourceExhausted) {
  const CacheGeometry geometry = SmallGeometry();
  MemoryBudget budget(5000);
  StreamAssembler assembler(geometry, {SequenceShape{100, 4, 0}}, &budget);
  ASSERT_TRUE(assembler.AddChunk(Chunk(0, 0, v1::TENSOR_KIND_KEYS, 0, Bytes(10))).ok());
  auto refused = assembler.AddChunk(Chunk(0, 0, v1::TENSOR_KIND_VALUES, 0, Bytes(10)));
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("server memory budget exhausted: a tensor buffer needs 3200 bytes while "
                        "3200 of 5000 bytes are in use"));
}

// A realistic stream: every tensor split into random pieces, all tensors of all layers and
// sequences interleaved at random (each tensor's pieces in order). Every layer must come out
// exactly once, byte-exact, at the chunk that completes it.
TEST(StreamAssemblerInterleavingTest, AssemblesByteExactLayers) {
  const CacheGeometry geometry = SmallGeometry();
  const std::vector<SequenceShape> sequences = SmallSequences();
  std::mt19937 rng(20240611);

  struct Tensor {
    uint32_t sequence, layer;
    v1::TensorKind kind;
    std::string bytes;
    size_t sent = 0;
  };
  std::vector<Tensor> tensors;
  for (uint32_t s = 0; s < sequences.size(); ++s) {
    for (uint32_t l = 0; l < static_cast<uint32_t>(geometry.num_layers); ++l) {
      for (v1::TensorKind kind : {v1::TENSOR_KIND_KEYS, v1::TENSOR_KIND_VALUES,
                                  v1::TENSOR_KIND_QUERIES, v1::TENSOR_KIND_SCORES}) {
        const size_t size = SmallTensorBytes(static_cast<int>(s), kind);
        if (size == 0) continue;
        std::string bytes(size, '\0');
        for (char& c : bytes) c = static_cast<char>(rng() & 0xff);
        tensors.push_back({s, l, kind, std::move(bytes)});
      }
    }
  }

  MemoryBudget budget(0);
  StreamAssembler assembler(geometry, sequences, &budget);
  std::map<std::pair<int, int>, AssembledLayer> completed;
  size_t remaining = tensors.size();
  while (remaining > 0) {
    std::vector<size_t> open;
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].sent < tensors[i].bytes.size()) open.push_back(i);
    }
    Tensor& tensor = tensors[open[rng() % open.size()]];
    const size_t left = tensor.bytes.size() - tensor.sent;
    const size_t piece = std::min<size_t>(left, 1 + rng() % 700);
    auto result = assembler.AddChunk(Chunk(tensor.sequence, tensor.layer, tensor.kind, tensor.sent,
                                           tensor.bytes.substr(tensor.sent, piece)));
    ASSERT_TRUE(result.ok()) << result.status();
    tensor.sent += piece;
    if (tensor.sent == tensor.bytes.size()) --remaining;
    if (result->has_value()) {
      AssembledLayer& layer = **result;
      const auto key = std::make_pair(layer.input.sequence, layer.input.layer);
      EXPECT_EQ(completed.count(key), 0u) << "layer completed twice";
      // Completed exactly when its last tensor's last byte arrived.
      for (const Tensor& t : tensors) {
        if (static_cast<int>(t.sequence) == key.first && static_cast<int>(t.layer) == key.second) {
          EXPECT_EQ(t.sent, t.bytes.size());
        }
      }
      completed.emplace(key, std::move(layer));
    }
  }
  ASSERT_EQ(completed.size(), sequences.size() * geometry.num_layers);
  EXPECT_TRUE(assembler.CheckComplete().ok());
  EXPECT_EQ(assembler.bytes_received(), assembler.bytes_expected());

  auto as_string = [](const void* data, size_t size) {
    return std::string(static_cast<const char*>(data), size);
  };
  for (const Tensor& tensor : tensors) {
    const LayerInput& input =
        completed.at({static_cast<int>(tensor.sequence), static_cast<int>(tensor.layer)}).input;
    EXPECT_EQ(input.shape.num_tokens, sequences[tensor.sequence].num_tokens);
    std::string got;
    switch (tensor.kind) {
      case v1::TENSOR_KIND_KEYS:
        got = as_string(input.keys.data(), input.keys.size());
        break;
      case v1::TENSOR_KIND_VALUES:
        got = as_string(input.values.data(), input.values.size());
        break;
      case v1::TENSOR_KIND_QUERIES:
        got = as_string(input.queries.data(), input.queries.size());
        break;
      default:
        got = as_string(input.scores.data(), input.scores.size() * sizeof(float));
        break;
    }
    EXPECT_TRUE(got == tensor.bytes)
        << "sequence " << tensor.sequence << " layer " << tensor.layer << " tensor " << tensor.kind;
  }
  completed.clear();
  EXPECT_EQ(budget.in_use_bytes(), 0u);
}

}  // namespace
}  // namespace kvcompress
