// `kvc inspect` end to end: kvc synth → kvc compress --local → kvc inspect --png. The table
// reports what StreamingLLM keeps (all sinks, all recent tokens), and the PNG on disk,
// decoded by libpng, is pixel for pixel the heatmap of the file it was made from.
#include <png.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "client/cache_file.h"
#include "client/kept_heatmap.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/kvcd_process.h"

namespace kvcompress::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::MatchesRegex;

struct DecodedPng {
  bool ok = false;
  std::string error;
  int width = 0;
  int height = 0;
  std::vector<uint8_t> rgb;
};

DecodedPng ReadPng(const std::string& path) {
  DecodedPng out;
  png_image image;
  std::memset(&image, 0, sizeof(image));
  image.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&image, path.c_str())) {
    out.error = image.message;
    return out;
  }
  image.format = PNG_FORMAT_RGB;
  out.width = static_cast<int>(image.width);
  out.height = static_cast<int>(image.height);
  out.rgb.resize(PNG_IMAGE_SIZE(image));
  out.ok = png_image_finish_read(&image, nullptr, out.rgb.data(), 0, nullptr) != 0;
  if (!out.ok) out.error = image.message;
  return out;
}

CommandResult Kvc(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {BinDir() + "/kvc"};
  argv.insert(argv.end(), args.begin(), args.end());
  absl::StatusOr<CommandResult> run = RunCommand(argv);
  EXPECT_TRUE(run.ok()) << run.status();
  return run.ok() ? *run : CommandResult{};
}

class KvcInspectTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(MakeScratchDir());
    const CommandResult synth =
        Kvc({"synth", "--output=" + Input(), "--layers=4", "--kv-heads=2", "--query-heads=8",
             "--head-dim=64", "--tokens=2000", "--window=16"});
    ASSERT_EQ(synth.exit_code, 0) << synth.output;
    // 4 sinks and the 64 most recent tokens.
    const CommandResult compress =
        Kvc({"compress", "--local", "--input=" + Input(), "--output=" + Output(),
             "--method=streaming", "--keep-tokens=68", "--sinks=4"});
    ASSERT_EQ(compress.exit_code, 0) << compress.output;
  }
  static void TearDownTestSuite() { delete dir_; }

  static std::string Input() { return *dir_ + "/cache.safetensors"; }
  static std::string Output() { return *dir_ + "/streaming.safetensors"; }

  static std::string* dir_;
};

std::string* KvcInspectTest::dir_ = nullptr;

TEST_F(KvcInspectTest, TableShowsSinksAndRecentWindowKept) {
  const CommandResult run = Kvc({"inspect", Output(), "--recent=64"});
  ASSERT_EQ(run.exit_code, 0) << run.output;
  EXPECT_THAT(run.output, HasSubstr("T=2000"));
  EXPECT_THAT(run.output, HasSubstr("streaming keep 68 tokens"));
  EXPECT_THAT(run.output, HasSubstr("sinks[4]"));
  EXPECT_THAT(run.output, HasSubstr("recent[64]"));
  // Every layer: 68 per head (min, mean, max), 3.40 %, all sinks and recent tokens kept,
  // both heads agree so the layer covers 3.40 % of the sequence.
  for (const std::string layer : {"0", "1", "2", "3", "all"}) {
    EXPECT_THAT(run.output, MatchesRegex("(.|\n)*\n *" + layer +
                                         " +68 +68\\.0 +68 +3\\.40% +100\\.0% +100\\.0% +3\\.4%"
                                         "(.|\n)*"))
        << layer;
  }
}

TEST_F(KvcInspectTest, PngIsTheHeatmapOfTheFile) {
  const std::string png = *dir_ + "/streaming.png";
  const CommandResult run = Kvc({"inspect", "--png", png, Output(), "--width=500"});
  ASSERT_EQ(run.exit_code, 0) << run.output;

  absl::StatusOr<CompressedCacheFile> file = ReadCompressedCache(Output());
  ASSERT_TRUE(file.ok()) << file.status();
  KeptHeatmapOptions options;
  options.max_columns = 500;
  options.title = "streaming keep 68 tokens  T=2000  4 LAYERS X 2 KV HEADS";
  absl::StatusOr<KeptHeatmap> expected = RenderKeptHeatmap(file->layers, 2000, options);
  ASSERT_TRUE(expected.ok()) << expected.status();

  const DecodedPng decoded = ReadPng(png);
  ASSERT_TRUE(decoded.ok) << decoded.error;
  EXPECT_EQ(decoded.width, expected->image.width());
  EXPECT_EQ(decoded.height, expected->image.height());
  EXPECT_THAT(run.output, HasSubstr(std::to_string(decoded.width) + "x" +
                                    std::to_string(decoded.height) + ": 500 columns of 4 tokens"));
  ASSERT_EQ(decoded.rgb.size(), expected->image.pixels().size());
  EXPECT_TRUE(std::equal(decoded.rgb.begin(), decoded.rgb.end(), expected->image.pixels().begin()));
  // And the picture says what streaming does: first and last columns bright, middle dark.
  const int y = expected->RowTop(2, 1);
  auto pixel = [&](int x) {
    const size_t offset = (static_cast<size_t>(y) * decoded.width + x) * 3;
    return Rgb{decoded.rgb[offset], decoded.rgb[offset + 1], decoded.rgb[offset + 2]};
  };
  EXPECT_EQ(pixel(expected->ColumnLeft(0)), ViridisColor(1.0));
  EXPECT_EQ(pixel(expected->ColumnLeft(250)), ViridisColor(0.0));
  EXPECT_EQ(pixel(expected->ColumnLeft(499)), ViridisColor(1.0));
}

TEST_F(KvcInspectTest, RowHeightSetsTheRowPixels) {
  const std::string png = *dir_ + "/tall.png";
  const CommandResult run = Kvc({"inspect", Output(), "--png=" + png, "--row-height=5"});
  ASSERT_EQ(run.exit_code, 0) << run.output;
  EXPECT_THAT(run.output, HasSubstr("5 px per head row"));
  EXPECT_TRUE(ReadPng(png).ok);
}

TEST_F(KvcInspectTest, ErrorsAreReported) {
  // An input cache is not a compressed one.
  const CommandResult wrong = Kvc({"inspect", Input()});
  EXPECT_EQ(wrong.exit_code, 1) << wrong.output;
  EXPECT_THAT(wrong.output, HasSubstr("cache.safetensors"));

  const CommandResult missing = Kvc({"inspect", *dir_ + "/nope.safetensors"});
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_THAT(missing.output, HasSubstr("nope.safetensors"));

  EXPECT_EQ(Kvc({"inspect"}).exit_code, 2);
  EXPECT_EQ(Kvc({"inspect", Output(), Output()}).exit_code, 2);
  const CommandResult width = Kvc({"inspect", Output(), "--width=100"});
  EXPECT_EQ(width.exit_code, 2);
  EXPECT_THAT(width.output, HasSubstr("--png only"));
}

}  // namespace
}  // namespace kvcompress::testing
