// End to end through the `kvc` tool: a real kvcd, real files. Checks that server and
// --local outputs are identical, that knorm keeps exactly the lowest-norm rows byte for
// byte, and that snapkv agrees with an independent float64 implementation under GQA.
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "client/cache_file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/dtype.h"
#include "tests/integration/float64_reference.h"
#include "tests/integration/kvcd_process.h"

namespace kvcompress::testing {
namespace {

using ::testing::HasSubstr;

struct InputSpec {
  DType dtype = DType::kBFloat16;
  int num_layers = 3;
  int num_kv_heads = 2;
  int num_query_heads = 8;  // GQA group of 4
  int head_dim = 64;
  int num_tokens = 733;
  int num_window_queries = 16;
  uint32_t seed = 1234;
};

void StoreElement(std::byte* base, DType dtype, size_t index, float value) {
  if (dtype == DType::kFloat32) {
    std::memcpy(base + index * 4, &value, 4);
    return;
  }
  const uint16_t bits = dtype == DType::kBFloat16 ? FloatToBFloat16(value) : FloatToFloat16(value);
  std::memcpy(base + index * 2, &bits, 2);
}

// Writes a random cache (fixed seed; keys with a per-token scale so norms spread out and
// queries correlated with a few keys so attention is far from uniform).
std::string WriteRandomInput(const std::string& dir, const InputSpec& spec) {
  CacheGeometry geometry{spec.num_layers, spec.num_kv_heads, spec.num_query_heads,
                         spec.head_dim,   spec.dtype,        Layout::kHND};
  SequenceShape shape{spec.num_tokens, spec.num_window_queries, 0};
  std::mt19937 rng(spec.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> scale(0.5f, 1.5f);
  std::vector<LayerInput> layers;
  for (int l = 0; l < spec.num_layers; ++l) {
    LayerInput layer;
    layer.layer = l;
    layer.shape = shape;
    layer.keys.resize(geometry.KeyValueBytes(spec.num_tokens));
    layer.values.resize(geometry.KeyValueBytes(spec.num_tokens));
    layer.queries.resize(geometry.QueryBytes(spec.num_window_queries));
    for (int h = 0; h < spec.num_kv_heads; ++h) {
      for (int t = 0; t < spec.num_tokens; ++t) {
        const float token_scale = scale(rng);
        for (int d = 0; d < spec.head_dim; ++d) {
          const size_t index = (size_t(h) * spec.num_tokens + t) * spec.head_dim + d;
          StoreElement(layer.keys.data(), spec.dtype, index, token_scale * normal(rng));
          StoreElement(layer.values.data(), spec.dtype, index, normal(rng));
        }
      }
    }
    for (size_t i = 0; i < layer.queries.size() / DTypeSize(spec.dtype); ++i) {
      StoreElement(layer.queries.data(), spec.dtype, i, 2.0f * normal(rng));
    }
    layers.push_back(std::move(layer));
  }
  const std::string path = dir + "/input_" + std::string(DTypeName(spec.dtype)) + ".safetensors";
  const absl::Status status = WriteCacheInput(path, geometry, shape, layers);
  EXPECT_TRUE(status.ok()) << status;
  return path;
}

Float64Layer ToFloat64(const CacheFileInput& input, int layer) {
  const CacheGeometry& g = input.geometry;
  Float64Layer out;
  out.num_kv_heads = g.num_kv_heads;
  out.num_query_heads = g.num_query_heads;
  out.num_tokens = static_cast<int>(input.shape.num_tokens);
  out.head_dim = g.head_dim;
  out.num_window_queries = input.shape.num_window_queries;
  const LayerInput& tensors = input.layers[layer];
  out.keys.resize(tensors.keys.size() / DTypeSize(g.dtype));
  for (size_t i = 0; i < out.keys.size(); ++i)
    out.keys[i] = LoadAsFloat(tensors.keys.data(), g.dtype, i);
  out.queries.resize(tensors.queries.size() / DTypeSize(g.dtype));
  for (size_t i = 0; i < out.queries.size(); ++i) {
    out.queries[i] = LoadAsFloat(tensors.queries.data(), g.dtype, i);
  }
  return out;
}

std::vector<int32_t> HeadPositions(const LayerResult& result, int head) {
  return std::vector<int32_t>(result.positions.begin() + result.offsets[head],
                              result.positions.begin() + result.offsets[head + 1]);
}

class KvcCliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto server = KvcdProcess::Start();
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
    dir_ = new std::string(MakeScratchDir());
  }
  static void TearDownTestSuite() {
    delete server_;
    delete dir_;
  }

  // Runs `kvc compress` against the server (or --local) and reads the output back.
  static CompressedCacheFile Compress(const std::string& input, bool local,
                                      const std::vector<std::string>& method_flags,
                                      const std::string& tag) {
    const std::string output = *dir_ + "/" + tag + (local ? "_local" : "_server") + ".safetensors";
    std::vector<std::string> argv = {BinDir() + "/kvc", "compress", "--input=" + input,
                                     "--output=" + output};
    argv.push_back(local ? "--local" : "--server=" + server_->target());
    argv.insert(argv.end(), method_flags.begin(), method_flags.end());
    auto run = RunCommand(argv);
    EXPECT_TRUE(run.ok()) << run.status();
    EXPECT_EQ(run->exit_code, 0) << run->output;
    auto file = ReadCompressedCache(output);
    EXPECT_TRUE(file.ok()) << file.status();
    return file.ok() ? std::move(*file) : CompressedCacheFile{};
  }

  static KvcdProcess* server_;
  static std::string* dir_;
};

KvcdProcess* KvcCliTest::server_ = nullptr;
std::string* KvcCliTest::dir_ = nullptr;

TEST_F(KvcCliTest, ServerAndLocalGiveIdenticalTensors) {
  for (DType dtype : {DType::kBFloat16, DType::kFloat16, DType::kFloat32}) {
    const std::string input = WriteRandomInput(*dir_, {.dtype = dtype});
    for (const auto& flags :
         std::vector<std::vector<std::string>>{{"--method=snapkv", "--keep=0.25"},
                                               {"--method=knorm", "--keep-tokens=100"},
                                               {"--method=streaming", "--keep=0.1", "--sinks=4"}}) {
      SCOPED_TRACE(std::string(DTypeName(dtype)) + " " + flags[0]);
      const CompressedCacheFile server = Compress(input, false, flags, "identical");
      const CompressedCacheFile local = Compress(input, true, flags, "identical");
      ASSERT_EQ(server.layers.size(), 3u);
      ASSERT_EQ(local.layers.size(), 3u);
      for (size_t l = 0; l < server.layers.size(); ++l) {
        EXPECT_EQ(server.layers[l].kept, local.layers[l].kept);
        EXPECT_EQ(server.layers[l].positions, local.layers[l].positions);
        EXPECT_TRUE(server.layers[l].keys == local.layers[l].keys);
        EXPECT_TRUE(server.layers[l].values == local.layers[l].values);
        EXPECT_DOUBLE_EQ(server.layers[l].attention_mass_kept, local.layers[l].attention_mass_kept);
      }
    }
  }
}

TEST_F(KvcCliTest, KnormKeepHalfKeepsExactlyTheLowestNormRowsByteForByte) {
  const std::string path = WriteRandomInput(*dir_, {.seed = 99});
  auto input = ReadCacheInput(path);
  ASSERT_TRUE(input.ok()) << input.status();
  const CompressedCacheFile output =
      Compress(path, false, {"--method=knorm", "--keep=0.5"}, "knorm");
  ASSERT_EQ(output.layers.size(), 3u);
  const int T = 733, D = 64, n = T / 2;  // floor(733 · 0.5)
  const size_t row_bytes = D * 2;
  for (int l = 0; l < 3; ++l) {
    const LayerResult& result = output.layers[l];
    const Float64Layer reference = ToFloat64(*input, l);
    const auto scores = KnormScores(reference);
    for (int h = 0; h < 2; ++h) {
      ASSERT_EQ(result.kept[h], n);
      const std::vector<int32_t> positions = HeadPositions(result, h);
      EXPECT_EQ(positions, TopPositions(scores[h], n)) << "layer " << l << " head " << h;
      for (int r = 0; r < n; ++r) {
        const size_t in_offset = (size_t(h) * T + positions[r]) * row_bytes;
        const size_t out_offset = size_t(result.offsets[h] + r) * row_bytes;
        ASSERT_EQ(std::memcmp(result.keys.data() + out_offset,
                              input->layers[l].keys.data() + in_offset, row_bytes),
                  0);
        ASSERT_EQ(std::memcmp(result.values.data() + out_offset,
                              input->layers[l].values.data() + in_offset, row_bytes),
                  0);
      }
    }
  }
}

TEST_F(KvcCliTest, SnapKvAgreesWithIndependentFloat64Implementation) {
  int near_tie_differences = 0;
  for (const InputSpec& spec :
       {InputSpec{.dtype = DType::kFloat32, .num_query_heads = 8, .seed = 5},
        InputSpec{.dtype = DType::kBFloat16,
        .num_query_heads = 16,
        .num_tokens = 1025,
        .num_window_queries = 32,
        .seed = 6},
        InputSpec{.dtype = DType::kFloat16,
        .num_query_heads = 2,
        .num_tokens = 300,
        .num_window_queries = 7,
        .seed = 7}}) {
    const std::string path = WriteRandomInput(*dir_, spec);
    auto input = ReadCacheInput(path);
    ASSERT_TRUE(input.ok()) << input.status();
    const CompressedCacheFile output =
        Compress(path, false, {"--method=snapkv", "--keep=0.2"}, "snapkv");
    ASSERT_EQ(output.layers.size(), size_t(spec.num_layers));
    const int n = spec.num_tokens / 5;
    for (int l = 0; l < spec.num_layers; ++l) {
      const auto scores = SnapKvScores(ToFloat64(*input, l), 5);
      for (int h = 0; h < spec.num_kv_heads; ++h) {
        const std::vector<int32_t> got = HeadPositions(output.layers[l], h);
        const std::vector<int32_t> want = TopPositions(scores[h], n);
        if (got == want) continue;
        const int explained = ExplainedByNearTies(scores[h], got, want, 1e-5);
        ASSERT_GE(explained, 0) << "layer " << l << " head " << h
                                << ": kept set differs beyond near-ties";
        near_tie_differences += explained;
      }
    }
  }
  EXPECT_LE(near_tie_differences, 2);
}

TEST_F(KvcCliTest, InfoListsMethods) {
  auto run = RunCommand({BinDir() + "/kvc", "info", "--server=" + server_->target()});
  ASSERT_TRUE(run.ok());
  EXPECT_EQ(run->exit_code, 0) << run->output;
  EXPECT_THAT(run->output, HasSubstr("snapkv"));
  EXPECT_THAT(run->output, HasSubstr("knorm"));
  // The test kvcd runs the CPU reference alone (KvcdProcess passes --backend=cpu): every
  // method runs on it, and the host is its device.
  EXPECT_THAT(run->output, HasSubstr("runs on"));
  EXPECT_THAT(run->output, ::testing::ContainsRegex("merge_nearest +yes +cpu "));
  EXPECT_THAT(run->output, HasSubstr("device          host ("));
}

TEST_F(KvcCliTest, UnknownMethodIsNamedAndFailsTheCommand) {
  const std::string input = WriteRandomInput(*dir_, {.seed = 3});
  auto run = RunCommand({BinDir() + "/kvc", "compress", "--server=" + server_->target(),
                         "--input=" + input, "--output=" + *dir_ + "/never.safetensors",
                         "--method=snapkv2", "--keep=0.5"});
  ASSERT_TRUE(run.ok());
  EXPECT_NE(run->exit_code, 0);
  EXPECT_THAT(run->output, HasSubstr("snapkv2"));
}

TEST_F(KvcCliTest, MissingInputFileIsReported) {
  auto run = RunCommand(
      {BinDir() + "/kvc", "compress", "--local", "--input=" + *dir_ + "/does_not_exist.safetensors",
       "--output=" + *dir_ + "/never.safetensors", "--method=knorm", "--keep=0.5"});
  ASSERT_TRUE(run.ok());
  EXPECT_NE(run->exit_code, 0);
  EXPECT_THAT(run->output, HasSubstr("does_not_exist.safetensors"));
}

}  // namespace
}  // namespace kvcompress::testing
