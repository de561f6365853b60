#include "service/layer_ready_assembler.h"

#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/service/host_regions.h"

namespace kvcompress {
namespace {

using ::testing::HasSubstr;

// Regions are host buffers standing in for opened device memory.
class LayerReadyAssemblerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    geometry_.num_layers = 2;
    geometry_.num_kv_heads = 2;
    geometry_.num_query_heads = 4;
    geometry_.head_dim = 8;
    geometry_.dtype = DType::kFloat16;
    geometry_.layout = Layout::kHND;
    // Sequence 0: T 16, W 2; sequence 1: T 8, scores per KV head.
    sequences_ = {SequenceShape{16, 2, 0}, SequenceShape{8, 0, 2}};
    channel_ = std::make_unique<Channel>("c", "cuda_ipc", "token", absl::Minutes(1),
                                         std::make_unique<testing::HostRegions>());
    RegionDescriptor region;
    region.size_bytes = 1 << 16;
    ASSERT_TRUE(channel_->AddRegion(region, 4).ok());
  }

  v1::CompressRequest Ready(uint32_t sequence, uint32_t layer, uint64_t offset = 0) {
    v1::CompressRequest request;
    v1::LayerReady& ready = *request.mutable_layer_ready();
    ready.set_sequence(sequence);
    ready.set_layer(layer);
    const SequenceShape& shape = sequences_[sequence];
    const uint64_t kv = geometry_.KeyValueBytes(shape.num_tokens);
    Slice(*ready.mutable_keys(), offset, kv);
    Slice(*ready.mutable_values(), offset + kv, kv);
    if (shape.num_window_queries > 0) {
      Slice(*ready.mutable_queries(), offset + 2 * kv,
            geometry_.QueryBytes(shape.num_window_queries));
    }
    if (shape.num_score_heads > 0) {
      Slice(*ready.mutable_scores(), offset + 2 * kv,
            CacheGeometry::ScoreBytes(shape.num_score_heads, shape.num_tokens));
    }
    return request;
  }
  static void Slice(v1::RegionSlice& slice, uint64_t offset, uint64_t bytes) {
    slice.set_region(0);
    slice.set_offset(offset);
    slice.set_bytes(bytes);
  }

  CacheGeometry geometry_;
  std::vector<SequenceShape> sequences_;
  std::unique_ptr<Channel> channel_;
};

TEST_F(LayerReadyAssemblerTest, ResolvesEveryLayerOnceAndChecksCompleteness) {
  LayerReadyAssembler assembler(geometry_, sequences_, channel_.get());
  absl::StatusOr<DeviceLayerInput> first = assembler.AddRequest(Ready(0, 1, 256));
  ASSERT_TRUE(first.ok()) << first.status();
  absl::StatusOr<std::byte*> base = channel_->ResolveSlice(0, 0, 16, 16, "base");
  ASSERT_TRUE(base.ok());
  EXPECT_EQ(first->keys - *base, 256);
  EXPECT_EQ(first->values - first->keys, static_cast<long>(geometry_.KeyValueBytes(16)));
  EXPECT_NE(first->queries, nullptr);
  EXPECT_EQ(first->scores, nullptr);
  EXPECT_EQ(first->shape.num_tokens, 16);
  EXPECT_EQ(first->layer, 1);

  absl::Status incomplete = assembler.CheckComplete();
  EXPECT_EQ(incomplete.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(incomplete.message(), HasSubstr("sequence 0 layer 0 never announced"));

  EXPECT_THAT(assembler.AddRequest(Ready(0, 1)).status().message(), HasSubstr("sent twice"));
  ASSERT_TRUE(assembler.AddRequest(Ready(0, 0)).ok());
  absl::StatusOr<DeviceLayerInput> scored = assembler.AddRequest(Ready(1, 0));
  ASSERT_TRUE(scored.ok()) << scored.status();
  EXPECT_NE(scored->scores, nullptr);
  EXPECT_EQ(scored->queries, nullptr);
  ASSERT_TRUE(assembler.AddRequest(Ready(1, 1)).ok());
  EXPECT_TRUE(assembler.CheckComplete().ok());
  EXPECT_EQ(assembler.layers_completed(), 4);
}

TEST_F(LayerReadyAssemblerTest, RejectsBadSlicesNamingTheField) {
  LayerReadyAssembler assembler(geometry_, sequences_, channel_.get());
  const auto message = [&](const v1::CompressRequest& request) {
    absl::StatusOr<DeviceLayerInput> input = assembler.AddRequest(request);
    EXPECT_EQ(input.status().code(), absl::StatusCode::kInvalidArgument);
    return std::string(input.status().message());
  };
  EXPECT_THAT(message(Ready(0, 0, 8)), HasSubstr("sequence 0 layer 0 keys: offset 8"));
  EXPECT_THAT(message(Ready(0, 0, (1 << 16) - 256)), HasSubstr("sequence 0 layer 0 keys: bytes ["));
  v1::CompressRequest short_values = Ready(0, 0);
  short_values.mutable_layer_ready()->mutable_values()->set_bytes(100);
  EXPECT_THAT(message(short_values), HasSubstr("values: expected 512 bytes"));
  v1::CompressRequest no_queries = Ready(0, 0);
  no_queries.mutable_layer_ready()->clear_queries();
  EXPECT_THAT(message(no_queries), HasSubstr("queries: missing"));
  v1::CompressRequest extra_scores = Ready(0, 0);
  Slice(*extra_scores.mutable_layer_ready()->mutable_scores(), 0, 16);
  EXPECT_THAT(message(extra_scores), HasSubstr("scores: given, but the header declares"));
  v1::CompressRequest foreign = Ready(0, 0);
  foreign.mutable_layer_ready()->mutable_keys()->set_region(3);
  EXPECT_THAT(message(foreign), HasSubstr("region 3 is not registered"));
  v1::CompressRequest out_of_range;
  out_of_range.mutable_layer_ready()->set_sequence(2);
  EXPECT_THAT(message(out_of_range), HasSubstr("sequence 2 out of range"));
  v1::CompressRequest chunk;
  chunk.mutable_chunk();
  EXPECT_THAT(message(chunk), HasSubstr("chunk on a cuda_ipc stream"));
  // The failures consumed nothing: the layer can still come.
  EXPECT_TRUE(assembler.AddRequest(Ready(0, 0)).ok());
}

TEST_F(LayerReadyAssemblerTest, NcclStreamsAnnounceLayersWithoutSlices) {
  LayerReadyAssembler assembler(geometry_, sequences_, nullptr);
  v1::CompressRequest bare;
  bare.mutable_layer_ready()->set_sequence(0);
  bare.mutable_layer_ready()->set_layer(1);
  absl::StatusOr<DeviceLayerInput> layer = assembler.AddRequest(bare);
  ASSERT_TRUE(layer.ok()) << layer.status();
  EXPECT_EQ(layer->keys, nullptr);  // the tensors come over the communicator
  EXPECT_EQ(layer->layer, 1);
  EXPECT_EQ(layer->shape.num_window_queries, 2);
  EXPECT_EQ(assembler.bytes_received(), 2 * geometry_.KeyValueBytes(16) + geometry_.QueryBytes(2));
  // Slices belong to cuda_ipc streams.
  absl::Status sliced = assembler.AddRequest(Ready(0, 0)).status();
  EXPECT_EQ(sliced.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(sliced.message(), HasSubstr("sequence 0 layer 0 keys: a region slice on an nccl"));
  v1::CompressRequest chunk;
  chunk.mutable_chunk()->set_layer(0);
  EXPECT_THAT(assembler.AddRequest(chunk).status().message(), HasSubstr("chunk on a nccl stream"));
  EXPECT_THAT(assembler.AddRequest(bare).status().message(), HasSubstr("sent twice"));
}

TEST_F(LayerReadyAssemblerTest, OutputSlicesAreCheckedAndResolved) {
  LayerReadyAssembler assembler(geometry_, sequences_, channel_.get());
  v1::CompressRequest with_output = Ready(0, 0);
  Slice(*with_output.mutable_layer_ready()->mutable_output(), 8192, 4096);
  absl::StatusOr<DeviceLayerInput> layer = assembler.AddRequest(with_output);
  ASSERT_TRUE(layer.ok()) << layer.status();
  absl::StatusOr<std::byte*> base = channel_->ResolveSlice(0, 0, 16, 16, "base");
  ASSERT_TRUE(base.ok());
  EXPECT_EQ(layer->output - *base, 8192);
  EXPECT_EQ(layer->output_capacity, 4096u);

  v1::CompressRequest misaligned = Ready(0, 1);
  Slice(*misaligned.mutable_layer_ready()->mutable_output(), 8200, 4096);
  absl::Status status = assembler.AddRequest(misaligned).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("sequence 0 layer 1 output: offset 8200"));

  v1::CompressRequest outside = Ready(0, 1);
  Slice(*outside.mutable_layer_ready()->mutable_output(), 1 << 15, 1 << 16);
  EXPECT_THAT(assembler.AddRequest(outside).status().message(), HasSubstr("outside region"));

  LayerReadyAssembler nccl(geometry_, sequences_, nullptr);
  v1::CompressRequest bare;
  bare.mutable_layer_ready()->set_sequence(0);
  Slice(*bare.mutable_layer_ready()->mutable_output(), 0, 4096);
  EXPECT_THAT(nccl.AddRequest(bare).status().message(),
              HasSubstr("output slices are for cuda_ipc"));
}

TEST(OutputLayoutTest, TensorsStartAtMultiplesOfSixteen) {
  const OutputRegionLayout place = OutputLayoutFor(3, 10);  // 30-byte keys and values
  EXPECT_EQ(place.keys_offset, 0u);
  EXPECT_EQ(place.values_offset, 32u);
  EXPECT_EQ(place.positions_offset, 64u);
  EXPECT_EQ(place.total_bytes, 76u);
}

}  // namespace
}  // namespace kvcompress
