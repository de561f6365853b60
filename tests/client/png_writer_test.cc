// The PNG writer, read back by libpng (an independent decoder that verifies every chunk CRC
// and the zlib stream's Adler-32): pixels round-trip exactly, text chunks survive, and a
// corrupted byte is caught, which shows the reader really checks what the round trip relies on.
#include "client/png_writer.h"

#include <png.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvcompress {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Pair;

struct Decoded {
  bool ok = false;
  std::string error;
  int width = 0;
  int height = 0;
  std::vector<uint8_t> rgb;
};

Decoded DecodeWithLibpng(const std::string& bytes) {
  Decoded out;
  png_image image;
  std::memset(&image, 0, sizeof(image));
  image.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_memory(&image, bytes.data(), bytes.size())) {
    out.error = image.message;
    return out;
  }
  image.format = PNG_FORMAT_RGB;
  out.width = static_cast<int>(image.width);
  out.height = static_cast<int>(image.height);
  out.rgb.resize(PNG_IMAGE_SIZE(image));
  if (!png_image_finish_read(&image, nullptr, out.rgb.data(), 0, nullptr)) {
    out.error = image.message;
    png_image_free(&image);
    return out;
  }
  out.ok = true;
  return out;
}

struct Chunk {
  std::string type;
  std::string data;
};

uint32_t BigEndian32(const std::string& bytes, size_t offset) {
  uint32_t value = 0;
  for (int i = 0; i < 4; ++i) value = (value << 8) | static_cast<uint8_t>(bytes[offset + i]);
  return value;
}

// The chunk sequence after the signature (no CRC check: libpng does that).
std::vector<Chunk> Chunks(const std::string& png) {
  std::vector<Chunk> chunks;
  for (size_t offset = 8; offset + 12 <= png.size();) {
    const uint32_t length = BigEndian32(png, offset);
    chunks.push_back({png.substr(offset + 4, 4), png.substr(offset + 8, length)});
    offset += 12 + length;
  }
  return chunks;
}

// Noise, smooth gradients and flat runs, so every filter type gets picked somewhere.
RgbImage TestImage(int width, int height) {
  RgbImage image(width, height);
  std::mt19937 rng(7);
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      Rgb color;
      if (y % 3 == 0) {
        color = Rgb{static_cast<uint8_t>(rng()), static_cast<uint8_t>(rng()),
                    static_cast<uint8_t>(rng())};
      } else if (y % 3 == 1) {
        color = Rgb{static_cast<uint8_t>(x * 3 + y), static_cast<uint8_t>(x * y),
                    static_cast<uint8_t>(255 - x)};
      } else {
        color = x < width / 2 ? Rgb{68, 1, 84} : Rgb{253, 231, 37};
      }
      image.Set(x, y, color);
    }
  }
  return image;
}

TEST(PngWriterTest, LibpngDecodesExactlyThePixelsWritten) {
  for (auto [width, height] : std::vector<std::pair<int, int>>{{1, 1}, {7, 5}, {300, 97}}) {
    SCOPED_TRACE(std::to_string(width) + "x" + std::to_string(height));
    const RgbImage image = TestImage(width, height);
    absl::StatusOr<std::string> png = EncodePng(image);
    ASSERT_TRUE(png.ok()) << png.status();
    const Decoded decoded = DecodeWithLibpng(*png);
    ASSERT_TRUE(decoded.ok) << decoded.error;
    EXPECT_EQ(decoded.width, width);
    EXPECT_EQ(decoded.height, height);
    EXPECT_TRUE(decoded.rgb == std::vector<uint8_t>(image.pixels().begin(), image.pixels().end()));
  }
}

TEST(PngWriterTest, LargeImagesSpanSeveralIdatChunks) {
  // Noise does not compress, so 800×600×3 bytes need two 1 MiB IDAT chunks.
  RgbImage image(800, 600);
  std::mt19937 rng(3);
  for (int y = 0; y < 600; ++y) {
    for (int x = 0; x < 800; ++x) {
      image.Set(x, y,
                Rgb{static_cast<uint8_t>(rng()), static_cast<uint8_t>(rng()),
                    static_cast<uint8_t>(rng())});
    }
  }
  absl::StatusOr<std::string> png = EncodePng(image);
  ASSERT_TRUE(png.ok()) << png.status();
  int idat = 0;
  for (const Chunk& chunk : Chunks(*png)) idat += chunk.type == "IDAT";
  EXPECT_GE(idat, 2);
  const Decoded decoded = DecodeWithLibpng(*png);
  ASSERT_TRUE(decoded.ok) << decoded.error;
  EXPECT_TRUE(decoded.rgb == std::vector<uint8_t>(image.pixels().begin(), image.pixels().end()));
}

TEST(PngWriterTest, ChunkLayoutAndTextEntries) {
  absl::StatusOr<std::string> png =
      EncodePng(TestImage(4, 3), {{"Title", "snapkv keep 0.1"}, {"Software", "kvc inspect"}});
  ASSERT_TRUE(png.ok()) << png.status();
  EXPECT_EQ(png->substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  const std::vector<Chunk> chunks = Chunks(*png);
  ASSERT_GE(chunks.size(), 5u);
  EXPECT_EQ(chunks.front().type, "IHDR");
  // 4 × 3, bit depth 8, colour type 2 (RGB), compression, filter and interlace 0.
  EXPECT_EQ(chunks.front().data, std::string("\0\0\0\x04\0\0\0\x03\x08\x02\0\0\0", 13));
  EXPECT_EQ(chunks.back().type, "IEND");
  std::vector<std::pair<std::string, std::string>> text;
  for (const Chunk& chunk : chunks) {
    if (chunk.type != "tEXt") continue;
    const size_t nul = chunk.data.find('\0');
    text.emplace_back(chunk.data.substr(0, nul), chunk.data.substr(nul + 1));
  }
  EXPECT_THAT(text, ElementsAre(Pair("Title", "snapkv keep 0.1"), Pair("Software", "kvc inspect")));
  EXPECT_TRUE(DecodeWithLibpng(*png).ok);
}

TEST(PngWriterTest, LibpngRejectsACorruptedChunk) {
  absl::StatusOr<std::string> png = EncodePng(TestImage(16, 16));
  ASSERT_TRUE(png.ok()) << png.status();
  // The last byte of the IDAT chunk's CRC: the 4 bytes before IEND's 12.
  std::string corrupted = *png;
  corrupted[corrupted.size() - 13] ^= 0x01;
  const Decoded decoded = DecodeWithLibpng(corrupted);
  EXPECT_FALSE(decoded.ok);
  EXPECT_THAT(decoded.error, HasSubstr("CRC"));
}

TEST(PngWriterTest, RejectsWhatPngCannotHold) {
  EXPECT_EQ(EncodePng(RgbImage(0, 5)).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodePng(RgbImage(2, 2), {{"", "x"}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodePng(RgbImage(2, 2), {{" Title", "x"}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodePng(RgbImage(2, 2), {{"Title", std::string("a\0b", 3)}}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(PngWriterTest, WritePngReplacesTheFileAtomicallyAndNamesThePathOnError) {
  const std::string path = ::testing::TempDir() + "png_writer_test.png";
  ASSERT_TRUE(WritePng(path, TestImage(9, 4)).ok());
  FILE* file = std::fopen(path.c_str(), "rb");
  ASSERT_NE(file, nullptr);
  std::string bytes(1 << 16, '\0');
  bytes.resize(std::fread(bytes.data(), 1, bytes.size(), file));
  std::fclose(file);
  const Decoded decoded = DecodeWithLibpng(bytes);
  ASSERT_TRUE(decoded.ok) << decoded.error;
  EXPECT_EQ(decoded.width, 9);

  const absl::Status missing_dir = WritePng("/nonexistent-dir/x.png", TestImage(2, 2));
  EXPECT_FALSE(missing_dir.ok());
  EXPECT_THAT(std::string(missing_dir.message()), HasSubstr("/nonexistent-dir/x.png"));
}

}  // namespace
}  // namespace kvcompress
