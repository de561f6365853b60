#include "client/cache_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "client/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvcompress {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

std::string TempPath(const std::string& name) {
  static const std::string dir = [] {
    std::string pattern = ::testing::TempDir() + "cache_file_test.XXXXXX";
    char* made = ::mkdtemp(pattern.data());
    return std::string(made ? made : ::testing::TempDir().c_str());
  }();
  return dir + "/" + name;
}

std::vector<std::byte> RandomBytes(size_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> bytes(count);
  for (std::byte& b : bytes) b = static_cast<std::byte>(rng() & 0xff);
  return bytes;
}

// Writes a file with a raw 8-byte length, header text and buffer.
void WriteRaw(const std::string& path, uint64_t length, const std::string& header,
              const std::vector<std::byte>& buffer) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((length >> (8 * i)) & 0xff));
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(reinterpret_cast<const char*>(buffer.data()),
            static_cast<std::streamsize>(buffer.size()));
}

void WriteRaw(const std::string& path, const std::string& header,
              const std::vector<std::byte>& buffer) {
  WriteRaw(path, header.size(), header, buffer);
}

std::vector<std::byte> FileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> bytes(text.size());
  std::memcpy(bytes.data(), text.data(), text.size());
  return bytes;
}

TEST(SafetensorsTest, RoundTripsEveryDTypeByteExact) {
  const std::string path = TempPath("all_dtypes.safetensors");
  struct Tensor {
    std::string name;
    TensorDType dtype;
    std::vector<int64_t> shape;
    std::vector<std::byte> data;
  };
  std::vector<Tensor> tensors = {
      {"a.f16", TensorDType::kF16, {3, 5, 7}, {}}, {"b.bf16", TensorDType::kBF16, {1, 13}, {}},
      {"c.f32", TensorDType::kF32, {17}, {}},      {"d.i32", TensorDType::kI32, {2, 3}, {}},
      {"e.empty", TensorDType::kF32, {0, 4}, {}},  {"f.scalar", TensorDType::kI32, {}, {}},
  };
  uint32_t seed = 1;
  SafetensorsWriter writer;
  for (Tensor& t : tensors) {
    size_t count = TensorDTypeSize(t.dtype);
    for (int64_t d : t.shape) count *= d;
    t.data = RandomBytes(count, seed++);
    ASSERT_TRUE(writer.Add(t.name, t.dtype, t.shape, t.data).ok());
  }
  writer.SetMetadata("model", "unit-test");
  writer.SetMetadata("unicode", "κv ✓");
  ASSERT_TRUE(writer.Write(path).ok());

  auto reader = SafetensorsReader::Open(path);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ((*reader)->metadata().at("model"), "unit-test");
  EXPECT_EQ((*reader)->metadata().at("unicode"), "κv ✓");
  ASSERT_EQ((*reader)->tensors().size(), tensors.size());
  for (const Tensor& t : tensors) {
    const TensorEntry* entry = (*reader)->Find(t.name);
    ASSERT_NE(entry, nullptr) << t.name;
    EXPECT_EQ(entry->dtype, t.dtype);
    EXPECT_EQ(entry->shape, t.shape);
    auto data = (*reader)->Data(*entry);
    ASSERT_EQ(data.size(), t.data.size());
    EXPECT_TRUE(std::equal(data.begin(), data.end(), t.data.begin())) << t.name;
    // 4-byte tensors are laid out first, so they stay aligned in the mapping.
    if (TensorDTypeSize(t.dtype) == 4) {
      EXPECT_EQ(reinterpret_cast<uintptr_t>(data.data()) % 4, 0u) << t.name;
    }
  }
  EXPECT_EQ((*reader)->Find("missing"), nullptr);

  // The header is padded to 8 bytes, as the Python package writes it.
  const auto bytes = FileBytes(path);
  uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | uint8_t(bytes[i]);
  EXPECT_EQ(header_length % 8, 0u);
}

TEST(SafetensorsTest, WriterRejectsBadTensors) {
  SafetensorsWriter writer;
  std::vector<std::byte> data(12);
  EXPECT_THAT(writer.Add("x", TensorDType::kF32, {4}, data).message(),
              AllOf(HasSubstr("\"x\""), HasSubstr("16"), HasSubstr("12")));
  ASSERT_TRUE(writer.Add("x", TensorDType::kF32, {3}, data).ok());
  EXPECT_EQ(writer.Add("x", TensorDType::kF32, {3}, data).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(writer.Add("__metadata__", TensorDType::kF32, {3}, data).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(writer.Add("y", TensorDType::kF32, {-3}, data).code(),
            absl::StatusCode::kInvalidArgument);
}

struct MalformedCase {
  std::string name;
  std::string header;
  size_t buffer_bytes;
  std::vector<std::string> message_parts;
};

TEST(SafetensorsTest, MalformedHeadersFailWithPreciseErrors) {
  const std::vector<MalformedCase> cases = {
      {"not_json", "{\"a\": ", 0, {"not valid JSON"}},
      {"not_object", "[1, 2]", 0, {"not a JSON object"}},
      {"offsets_out_of_range",
       R"({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})",
       8,
       {"tensor \"t\"", "out of range", "8 bytes"}},
      {"wrong_size",
       R"({"t": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 10]}})",
       16,
       {"tensor \"t\"", "needs 12 bytes", "hold 10"}},
      {"begin_after_end",
       R"({"t": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})",
       16,
       {"tensor \"t\"", "begin after end"}},
      {"overlap",
       R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
       R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
       16,
       {"\"b\"", "overlaps", "\"a\""}},
      {"unknown_dtype",
       R"({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}})",
       2,
       {"tensor \"t\"", "unknown dtype \"Q4\""}},
      {"negative_dim",
       R"({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})",
       4,
       {"tensor \"t\"", "non-negative"}},
      {"missing_offsets", R"({"t": {"dtype": "F32", "shape": [1]}})", 4, {"data_offsets"}},
      {"overflowing_shape",
       R"({"t": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}})",
       4,
       {"tensor \"t\"", "overflows"}},
      {"metadata_not_string", R"({"__metadata__": {"k": 3}})", 0, {"__metadata__", "\"k\""}},
  };
  for (const MalformedCase& c : cases) {
    const std::string path = TempPath(c.name + ".safetensors");
    WriteRaw(path, c.header, std::vector<std::byte>(c.buffer_bytes));
    auto reader = SafetensorsReader::Open(path);
    ASSERT_FALSE(reader.ok()) << c.name;
    EXPECT_EQ(reader.status().code(), absl::StatusCode::kInvalidArgument) << c.name;
    EXPECT_THAT(reader.status().message(), HasSubstr(path)) << c.name;
    for (const std::string& part : c.message_parts) {
      EXPECT_THAT(reader.status().message(), HasSubstr(part)) << c.name;
    }
  }
}

TEST(SafetensorsTest, TruncatedAndBadLengthFiles) {
  const std::string short_path = TempPath("short.safetensors");
  {
    std::ofstream out(short_path, std::ios::binary);
    out.write("\x10\x00\x00", 3);
  }
  auto reader = SafetensorsReader::Open(short_path);
  EXPECT_EQ(reader.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(reader.status().message(), AllOf(HasSubstr(short_path), HasSubstr("truncated")));

  const std::string long_header = TempPath("long_header.safetensors");
  WriteRaw(long_header, 1000, "{}", {});
  reader = SafetensorsReader::Open(long_header);
  EXPECT_EQ(reader.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(reader.status().message(),
              AllOf(HasSubstr("header length 1000"), HasSubstr("truncated")));

  const std::string huge_header = TempPath("huge_header.safetensors");
  WriteRaw(huge_header, uint64_t{1} << 40, "{}", {});
  reader = SafetensorsReader::Open(huge_header);
  EXPECT_EQ(reader.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(reader.status().message(), HasSubstr("header length 1099511627776"));

  const std::string zero_header = TempPath("zero_header.safetensors");
  WriteRaw(zero_header, 0, "", {});
  reader = SafetensorsReader::Open(zero_header);
  EXPECT_EQ(reader.status().code(), absl::StatusCode::kInvalidArgument);

  // A valid file cut short inside the data buffer: the offsets no longer fit.
  const std::string good = TempPath("good.safetensors");
  SafetensorsWriter writer;
  const auto data = RandomBytes(64, 9);
  ASSERT_TRUE(writer.Add("layers.0.keys", TensorDType::kF32, {16}, data).ok());
  ASSERT_TRUE(writer.Write(good).ok());
  auto bytes = FileBytes(good);
  const std::string cut = TempPath("cut.safetensors");
  {
    std::ofstream out(cut, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size() - 5));
  }
  reader = SafetensorsReader::Open(cut);
  EXPECT_EQ(reader.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(reader.status().message(),
              AllOf(HasSubstr(cut), HasSubstr("layers.0.keys"), HasSubstr("out of range")));

  EXPECT_EQ(SafetensorsReader::Open(TempPath("does_not_exist")).status().code(),
            absl::StatusCode::kNotFound);
}

// Random corruptions of a valid file must fail cleanly (or still parse), never crash.
TEST(SafetensorsTest, CorruptedFilesNeverCrash) {
  const std::string good = TempPath("fuzz_good.safetensors");
  {
    SafetensorsWriter writer;
    const auto a = RandomBytes(4 * 24, 1);
    const auto b = RandomBytes(2 * 10, 2);
    ASSERT_TRUE(writer.Add("layers.0.keys", TensorDType::kF32, {2, 3, 4}, a).ok());
    ASSERT_TRUE(writer.Add("layers.0.values", TensorDType::kBF16, {10}, b).ok());
    writer.SetMetadata("format", "kvcompress.cache.v1");
    ASSERT_TRUE(writer.Write(good).ok());
  }
  const std::vector<std::byte> original = FileBytes(good);
  std::mt19937 rng(2024);
  const std::string path = TempPath("fuzz.safetensors");
  int rejected = 0;
  for (int round = 0; round < 2000; ++round) {
    std::vector<std::byte> bytes = original;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits && !bytes.empty(); ++e) {
      switch (rng() % 3) {
        case 0:  // flip a byte, mostly inside the length and header
          bytes[rng() % std::min<size_t>(bytes.size(), 200)] = static_cast<std::byte>(rng());
          break;
        case 1:  // replace a digit, which moves offsets and shapes
          for (std::byte& b : bytes) {
            if (b >= std::byte{'0'} && b <= std::byte{'9'} && rng() % 8 == 0) {
              b = static_cast<std::byte>('0' + rng() % 10);
              break;
            }
          }
          break;
        default:  // truncate
          bytes.resize(rng() % bytes.size());
          break;
      }
    }
    {
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out.write(reinterpret_cast<const char*>(bytes.data()),
                static_cast<std::streamsize>(bytes.size()));
    }
    auto reader = SafetensorsReader::Open(path);
    if (!reader.ok()) {
      ++rejected;
      EXPECT_EQ(reader.status().code(), absl::StatusCode::kInvalidArgument) << reader.status();
      continue;
    }
    // Whatever parsed must be internally consistent.
    for (const TensorEntry& entry : (*reader)->tensors()) {
      auto data = (*reader)->Data(entry);
      uint8_t checksum = 0;
      for (std::byte b : data) checksum ^= static_cast<uint8_t>(b);
      EXPECT_LE(entry.end, bytes.size()) << static_cast<int>(checksum);
    }
    (void)ReadCacheInput(path);
  }
  EXPECT_GT(rejected, 1000);
}

// A small input cache with every optional tensor.
struct SmallCache {
  CacheGeometry geometry;
  SequenceShape shape;
  std::vector<LayerInput> layers;
};

SmallCache MakeSmallCache(DType dtype, bool queries, int score_heads, uint32_t seed) {
  SmallCache cache;
  cache.geometry.num_layers = 3;
  cache.geometry.num_kv_heads = 2;
  cache.geometry.num_query_heads = 6;
  cache.geometry.head_dim = 8;
  cache.geometry.dtype = dtype;
  cache.shape.num_tokens = 11;
  cache.shape.num_window_queries = queries ? 3 : 0;
  cache.shape.num_score_heads = score_heads;
  for (int l = 0; l < 3; ++l) {
    LayerInput layer;
    layer.layer = l;
    layer.shape = cache.shape;
    layer.keys = RandomBytes(cache.geometry.KeyValueBytes(11), seed + 10 * l);
    layer.values = RandomBytes(cache.geometry.KeyValueBytes(11), seed + 10 * l + 1);
    if (queries) layer.queries = RandomBytes(cache.geometry.QueryBytes(3), seed + 10 * l + 2);
    std::mt19937 rng(seed + 10 * l + 3);
    for (int i = 0; i < score_heads * 11; ++i) layer.scores.push_back(float(rng()) / 7.0f);
    cache.layers.push_back(std::move(layer));
  }
  return cache;
}

TEST(CacheFileTest, InputRoundTripIsByteExactForEveryDType) {
  for (DType dtype : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
    for (int variant = 0; variant < 3; ++variant) {
      const bool queries = variant != 0;
      const int score_heads = variant == 2 ? 6 : (variant == 1 ? 2 : 0);
      SmallCache cache = MakeSmallCache(dtype, queries, score_heads, 100 + variant);
      const std::string path = TempPath("input.safetensors");
      ASSERT_TRUE(
          WriteCacheInput(path, cache.geometry, cache.shape, cache.layers, {{"model", "toy"}})
              .ok());
      auto read = ReadCacheInput(path);
      ASSERT_TRUE(read.ok()) << read.status();
      EXPECT_EQ(read->geometry.num_layers, 3);
      EXPECT_EQ(read->geometry.num_kv_heads, 2);
      EXPECT_EQ(read->geometry.num_query_heads, 6);
      EXPECT_EQ(read->geometry.head_dim, 8);
      EXPECT_EQ(read->geometry.dtype, dtype);
      EXPECT_EQ(read->geometry.layout, Layout::kHND);
      EXPECT_EQ(read->shape.num_tokens, 11);
      EXPECT_EQ(read->shape.num_window_queries, queries ? 3 : 0);
      EXPECT_EQ(read->shape.num_score_heads, score_heads);
      EXPECT_EQ(read->metadata.at("model"), "toy");
      EXPECT_EQ(read->metadata.at("format"), kCacheFileFormat);
      for (int l = 0; l < 3; ++l) {
        const LayerInput& a = cache.layers[l];
        const LayerInput& b = read->layers[l];
        EXPECT_EQ(b.layer, l);
        EXPECT_EQ(a.keys, b.keys);
        EXPECT_EQ(a.values, b.values);
        EXPECT_EQ(a.queries, b.queries);
        EXPECT_EQ(a.scores, b.scores);  // finite values: equality is bitwise here
      }
    }
  }
}

TEST(CacheFileTest, ViewPointsIntoTheFile) {
  SmallCache cache = MakeSmallCache(DType::kBFloat16, true, 0, 7);
  const std::string path = TempPath("view.safetensors");
  ASSERT_TRUE(WriteCacheInput(path, cache.geometry, cache.shape, cache.layers).ok());
  auto view = CacheFileView::Open(path);
  ASSERT_TRUE(view.ok()) << view.status();
  for (int l = 0; l < 3; ++l) {
    auto keys = (*view)->keys(l);
    ASSERT_EQ(keys.size(), cache.layers[l].keys.size());
    EXPECT_EQ(std::memcmp(keys.data(), cache.layers[l].keys.data(), keys.size()), 0);
    EXPECT_TRUE((*view)->scores(l).empty());
    EXPECT_EQ((*view)->LayerBytes(l), 2 * keys.size() + cache.layers[l].queries.size());
  }
}

TEST(CacheFileTest, QueryHeadsComeFromMetadataWithoutQueries) {
  SmallCache cache = MakeSmallCache(DType::kFloat16, false, 0, 3);
  const std::string path = TempPath("no_queries.safetensors");
  ASSERT_TRUE(WriteCacheInput(path, cache.geometry, cache.shape, cache.layers).ok());
  auto read = ReadCacheInput(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->geometry.num_query_heads, 6);
}

TEST(CacheFileTest, InconsistentInputFilesAreRejected) {
  const auto f32 = [](int64_t n) { return std::vector<std::byte>(n * 4); };
  struct Case {
    std::string name;
    std::vector<std::tuple<std::string, std::vector<int64_t>, TensorDType>> tensors;
    std::vector<std::string> parts;
  };
  const std::vector<Case> cases = {
      {"missing_values",
       {{"layers.0.keys", {2, 4, 8}, TensorDType::kF32}},
       {"layers.0.values", "missing"}},
      {"layer_gap",
       {{"layers.0.keys", {2, 4, 8}, TensorDType::kF32},
        {"layers.0.values", {2, 4, 8}, TensorDType::kF32},
        {"layers.2.keys", {2, 4, 8}, TensorDType::kF32},
        {"layers.2.values", {2, 4, 8}, TensorDType::kF32}},
       {"layers.1.keys", "missing"}},
      {"shape_mismatch",
       {{"layers.0.keys", {2, 4, 8}, TensorDType::kF32},
        {"layers.0.values", {2, 5, 8}, TensorDType::kF32}},
       {"layers.0.values", "shape [2, 5, 8], expected [2, 4, 8]"}},
      {"int_keys",
       {{"layers.0.keys", {2, 4, 8}, TensorDType::kI32},
        {"layers.0.values", {2, 4, 8}, TensorDType::kI32}},
       {"layers.0.keys", "dtype I32"}},
      {"rank2_keys",
       {{"layers.0.keys", {8, 8}, TensorDType::kF32},
        {"layers.0.values", {8, 8}, TensorDType::kF32}},
       {"layers.0.keys", "num_kv_heads"}},
      {"bad_query_heads",
       {{"layers.0.keys", {2, 4, 8}, TensorDType::kF32},
        {"layers.0.values", {2, 4, 8}, TensorDType::kF32},
        {"layers.0.queries", {3, 2, 8}, TensorDType::kF32}},
       {"layers.0.queries", "multiple of 2"}},
      {"queries_in_one_layer",
       {{"layers.0.keys", {2, 4, 8}, TensorDType::kF32},
        {"layers.0.values", {2, 4, 8}, TensorDType::kF32},
        {"layers.1.keys", {2, 4, 8}, TensorDType::kF32},
        {"layers.1.values", {2, 4, 8}, TensorDType::kF32},
        {"layers.1.queries", {2, 2, 8}, TensorDType::kF32}},
       {"layers.1.queries", "every layer or none"}},
      {"bad_scores",
       {{"layers.0.keys", {2, 4, 8}, TensorDType::kF32},
        {"layers.0.values", {2, 4, 8}, TensorDType::kF32},
        {"layers.0.scores", {2, 5}, TensorDType::kF32}},
       {"layers.0.scores", "expected [2 or 2, 4]"}},
      {"unknown_kind",
       {{"layers.0.keys", {2, 4, 8}, TensorDType::kF32},
        {"layers.0.values", {2, 4, 8}, TensorDType::kF32},
        {"layers.0.kees", {2, 4, 8}, TensorDType::kF32}},
       {"layers.0.kees", "unknown tensor kind"}},
      {"no_layers", {{"weights", {2}, TensorDType::kF32}}, {"no layers.{l}.keys"}},
  };
  for (const Case& c : cases) {
    std::vector<std::vector<std::byte>> storage;
    SafetensorsWriter writer;
    for (const auto& [name, shape, dtype] : c.tensors) {
      int64_t count = 1;
      for (int64_t d : shape) count *= d;
      storage.push_back(std::vector<std::byte>(count * TensorDTypeSize(dtype)));
      ASSERT_TRUE(writer.Add(name, dtype, shape, storage.back()).ok()) << c.name;
    }
    (void)f32;
    const std::string path = TempPath(c.name + ".safetensors");
    ASSERT_TRUE(writer.Write(path).ok());
    auto read = ReadCacheInput(path);
    ASSERT_FALSE(read.ok()) << c.name;
    EXPECT_EQ(read.status().code(), absl::StatusCode::kInvalidArgument) << c.name;
    EXPECT_THAT(read.status().message(), HasSubstr(path)) << c.name;
    for (const std::string& part : c.parts) {
      EXPECT_THAT(read.status().message(), HasSubstr(part)) << c.name;
    }
  }
}

// Ragged results for a small geometry: head h keeps h + 2 tokens at positions 0, 2, 4, ...
std::vector<LayerResult> MakeResults(const CacheGeometry& geometry, bool merged) {
  std::vector<LayerResult> results;
  const size_t row_bytes = geometry.head_dim * DTypeSize(geometry.dtype);
  for (int l = 0; l < geometry.num_layers; ++l) {
    LayerResult r;
    r.layer = l;
    r.offsets.push_back(0);
    for (int h = 0; h < geometry.num_kv_heads; ++h) {
      r.kept.push_back(h + 2 + l);
      r.offsets.push_back(r.offsets.back() + r.kept.back());
      for (int i = 0; i < r.kept.back(); ++i) {
        r.positions.push_back(2 * i);
        if (merged) r.merged.push_back(1 + i % 3);
      }
    }
    r.keys = RandomBytes(r.total_kept() * row_bytes, 50 + l);
    r.values = RandomBytes(r.total_kept() * row_bytes, 60 + l);
    r.attention_mass_kept = l == 0 ? -1.0 : 0.25 * l + 1.0 / 3.0;
    results.push_back(std::move(r));
  }
  return results;
}

TEST(CacheFileTest, CompressedRoundTripRaggedAndPadded) {
  for (DType dtype : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
    for (bool merged : {false, true}) {
      CacheGeometry geometry;
      geometry.num_layers = 2;
      geometry.num_kv_heads = 3;
      geometry.num_query_heads = 6;
      geometry.head_dim = 4;
      geometry.dtype = dtype;
      const std::vector<LayerResult> results = MakeResults(geometry, merged);
      CompressedCacheInfo info;
      info.method = "snapkv";
      info.parameters_json = R"({"scorer":{"snapkv":{}},"keepRatio":0.1})";
      info.extra["backend"] = "test";

      std::vector<CompressedLayerView> ragged;
      for (const LayerResult& r : results) ragged.push_back(ViewOf(r));
      const std::string ragged_path = TempPath("ragged.safetensors");
      ASSERT_TRUE(WriteCompressedCache(ragged_path, geometry, 20, ragged, info).ok());

      // The padded layout, built by hand: [H, max_kept, ...].
      std::vector<PaddedLayerResult> padded(results.size());
      std::vector<CompressedLayerView> padded_views;
      const size_t row_bytes = geometry.head_dim * DTypeSize(dtype);
      for (size_t l = 0; l < results.size(); ++l) {
        const LayerResult& r = results[l];
        PaddedLayerResult& p = padded[l];
        p.kept = r.kept;
        p.max_kept = *std::max_element(r.kept.begin(), r.kept.end()) + 1;
        p.keys.assign(geometry.num_kv_heads * p.max_kept * row_bytes, std::byte{0});
        p.values = p.keys;
        p.positions.assign(geometry.num_kv_heads * p.max_kept, -1);
        if (merged) p.merged.assign(p.positions.size(), 0);
        for (int h = 0; h < geometry.num_kv_heads; ++h) {
          for (int i = 0; i < r.kept[h]; ++i) {
            const size_t src = r.offsets[h] + i;
            const size_t dst = h * p.max_kept + i;
            std::memcpy(&p.keys[dst * row_bytes], &r.keys[src * row_bytes], row_bytes);
            std::memcpy(&p.values[dst * row_bytes], &r.values[src * row_bytes], row_bytes);
            p.positions[dst] = r.positions[src];
            if (merged) p.merged[dst] = r.merged[src];
          }
        }
        padded_views.push_back(ViewOf(p, static_cast<int>(l), r.attention_mass_kept));
      }
      const std::string padded_path = TempPath("padded.safetensors");
      ASSERT_TRUE(WriteCompressedCache(padded_path, geometry, 20, padded_views, info).ok());

      for (const std::string& path : {ragged_path, padded_path}) {
        auto read = ReadCompressedCache(path);
        ASSERT_TRUE(read.ok()) << read.status();
        EXPECT_EQ(read->padded, path == padded_path);
        EXPECT_EQ(read->num_tokens, 20);
        EXPECT_EQ(read->geometry.num_query_heads, 6);
        EXPECT_EQ(read->geometry.dtype, dtype);
        EXPECT_EQ(read->metadata.at("method"), "snapkv");
        EXPECT_EQ(read->metadata.at("parameters"), info.parameters_json);
        EXPECT_EQ(read->metadata.at("backend"), "test");
        EXPECT_EQ(read->metadata.at("tokens_in"), "120");   // 2 layers × 3 heads × 20
        EXPECT_EQ(read->metadata.at("tokens_kept"), "21");  // (2+3+4) + (3+4+5)
        ASSERT_EQ(read->layers.size(), 2u);
        for (int l = 0; l < 2; ++l) {
          const LayerResult& a = results[l];
          const LayerResult& b = read->layers[l];
          EXPECT_EQ(a.kept, b.kept);
          EXPECT_EQ(a.offsets, b.offsets);
          EXPECT_EQ(a.keys, b.keys);
          EXPECT_EQ(a.values, b.values);
          EXPECT_EQ(a.positions, b.positions);
          EXPECT_EQ(a.merged, b.merged);
          EXPECT_EQ(a.attention_mass_kept, b.attention_mass_kept);
        }
      }
    }
  }
}

TEST(CacheFileTest, CompressedWriterChecksSizes) {
  CacheGeometry geometry;
  geometry.num_layers = 2;
  geometry.num_kv_heads = 3;
  geometry.num_query_heads = 3;
  geometry.head_dim = 4;
  geometry.dtype = DType::kFloat32;
  std::vector<LayerResult> results = MakeResults(geometry, false);
  std::vector<CompressedLayerView> views;
  for (const LayerResult& r : results) views.push_back(ViewOf(r));
  CompressedCacheInfo info;
  const std::string path = TempPath("bad_out.safetensors");

  auto missing = std::vector<CompressedLayerView>{views[0]};
  EXPECT_THAT(WriteCompressedCache(path, geometry, 20, missing, info).message(),
              HasSubstr("2 layers, got 1"));
  auto twice = std::vector<CompressedLayerView>{views[0], views[0]};
  EXPECT_THAT(WriteCompressedCache(path, geometry, 20, twice, info).message(),
              HasSubstr("given twice"));
  auto short_keys = views;
  short_keys[1].keys = short_keys[1].keys.subspan(4);
  EXPECT_THAT(WriteCompressedCache(path, geometry, 20, short_keys, info).message(),
              HasSubstr("layer 1: keys/values"));
  EXPECT_THAT(WriteCompressedCache(path, geometry, 3, views, info).message(),
              HasSubstr("not in [0, 3]"));
}

TEST(CacheFileTest, CompressedReaderRejectsInputFilesAndBadPositions) {
  SmallCache cache = MakeSmallCache(DType::kFloat32, false, 0, 5);
  const std::string input_path = TempPath("as_input.safetensors");
  ASSERT_TRUE(WriteCacheInput(input_path, cache.geometry, cache.shape, cache.layers).ok());
  EXPECT_THAT(ReadCompressedCache(input_path).status().message(),
              HasSubstr("expected \"kvcompress.compressed.v1\""));

  CacheGeometry geometry;
  geometry.num_layers = 1;
  geometry.num_kv_heads = 1;
  geometry.num_query_heads = 1;
  geometry.head_dim = 2;
  geometry.dtype = DType::kFloat32;
  std::vector<LayerResult> results = MakeResults(geometry, false);
  results[0].positions[1] = results[0].positions[0];  // not ascending
  std::vector<CompressedLayerView> views = {ViewOf(results[0])};
  const std::string path = TempPath("bad_positions.safetensors");
  ASSERT_TRUE(WriteCompressedCache(path, geometry, 20, views, {}).ok());
  auto read = ReadCompressedCache(path);
  EXPECT_EQ(read.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(read.status().message(),
              AllOf(HasSubstr("layers.0.positions"), HasSubstr("not ascending")));

  // An input file is not a compressed file, and vice versa.
  EXPECT_THAT(ReadCacheInput(path).status().message(),
              HasSubstr("expected \"kvcompress.cache.v1\""));
}

}  // namespace
}  // namespace kvcompress
