#include "client/png_writer.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <array>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <span>

#include "absl/strings/str_cat.h"

namespace kvcompress {
namespace {

constexpr int kBytesPerPixel = 3;
// IDAT payloads are split at this size; any size is valid, smaller chunks only let a
// streaming decoder start earlier.
constexpr size_t kMaxIdatBytes = 1 << 20;

void AppendBigEndian32(std::string& out, uint32_t value) {
  out.push_back(static_cast<char>(value >> 24));
  out.push_back(static_cast<char>(value >> 16));
  out.push_back(static_cast<char>(value >> 8));
  out.push_back(static_cast<char>(value));
}

// Length, type, data, then the CRC-32 of type and data (PNG §5.3).
void AppendChunk(std::string& out, const char (&type)[5], std::span<const uint8_t> data) {
  AppendBigEndian32(out, static_cast<uint32_t>(data.size()));
  out.append(type, 4);
  out.append(reinterpret_cast<const char*>(data.data()), data.size());
  uLong crc = crc32(0L, Z_NULL, 0);
  crc = crc32(crc, reinterpret_cast<const Bytef*>(type), 4);
  // zlib's crc32 takes a uInt length; chunks here are far below 4 GiB.
  crc = crc32(crc, data.data(), static_cast<uInt>(data.size()));
  AppendBigEndian32(out, static_cast<uint32_t>(crc));
}

uint8_t Paeth(int a, int b, int c) {
  const int p = a + b - c;
  const int pa = std::abs(p - a), pb = std::abs(p - b), pc = std::abs(p - c);
  if (pa <= pb && pa <= pc) return static_cast<uint8_t>(a);
  if (pb <= pc) return static_cast<uint8_t>(b);
  return static_cast<uint8_t>(c);
}

// Writes filter type `type` of `row` (previous row `prior`, zeros for the first) into `out`
// (1 + row bytes) and returns the sum of the filtered bytes read as signed values.
uint64_t FilterRow(int type, std::span<const uint8_t> row, std::span<const uint8_t> prior,
                   uint8_t* out) {
  out[0] = static_cast<uint8_t>(type);
  uint64_t cost = 0;
  for (size_t i = 0; i < row.size(); ++i) {
    const int a = i >= kBytesPerPixel ? row[i - kBytesPerPixel] : 0;
    const int b = prior.empty() ? 0 : prior[i];
    const int c = (i >= kBytesPerPixel && !prior.empty()) ? prior[i - kBytesPerPixel] : 0;
    int predictor = 0;
    switch (type) {
      case 1:
        predictor = a;
        break;
      case 2:
        predictor = b;
        break;
      case 3:
        predictor = (a + b) / 2;
        break;
      case 4:
        predictor = Paeth(a, b, c);
        break;
      default:
        break;
    }
    const uint8_t value = static_cast<uint8_t>(row[i] - predictor);
    out[1 + i] = value;
    cost += static_cast<uint64_t>(std::abs(static_cast<int8_t>(value)));
  }
  return cost;
}

// The filtered scanlines (PNG §9): one filter byte then the row, per row.
std::vector<uint8_t> FilteredScanlines(const RgbImage& image) {
  const size_t row_bytes = static_cast<size_t>(image.width()) * kBytesPerPixel;
  std::vector<uint8_t> out((1 + row_bytes) * image.height());
  std::vector<uint8_t> candidate(1 + row_bytes);
  for (int y = 0; y < image.height(); ++y) {
    const std::span<const uint8_t> row = image.Row(y);
    const std::span<const uint8_t> prior = y > 0 ? image.Row(y - 1) : std::span<const uint8_t>();
    uint8_t* best = &out[y * (1 + row_bytes)];
    uint64_t best_cost = FilterRow(0, row, prior, best);
    for (int type = 1; type <= 4 && best_cost > 0; ++type) {
      const uint64_t cost = FilterRow(type, row, prior, candidate.data());
      if (cost < best_cost) {
        best_cost = cost;
        std::memcpy(best, candidate.data(), candidate.size());
      }
    }
  }
  return out;
}

absl::StatusOr<std::vector<uint8_t>> Deflate(const std::vector<uint8_t>& data) {
  z_stream stream{};
  if (deflateInit(&stream, Z_BEST_COMPRESSION) != Z_OK) {
    return absl::InternalError("PNG: deflateInit failed");
  }
  std::vector<uint8_t> out(deflateBound(&stream, static_cast<uLong>(data.size())));
  stream.next_in = const_cast<Bytef*>(data.data());
  stream.avail_in = static_cast<uInt>(data.size());
  stream.next_out = out.data();
  stream.avail_out = static_cast<uInt>(out.size());
  const int result = deflate(&stream, Z_FINISH);
  const size_t produced = stream.total_out;
  deflateEnd(&stream);
  // deflateBound guarantees room for the whole stream in one call.
  if (result != Z_STREAM_END) {
    return absl::InternalError(absl::StrCat("PNG: deflate failed (zlib code ", result, ")"));
  }
  out.resize(produced);
  return out;
}

absl::Status CheckText(const PngTextEntry& entry) {
  const std::string& keyword = entry.first;
  if (keyword.empty() || keyword.size() > 79) {
    return absl::InvalidArgumentError(
        absl::StrCat("PNG text keyword \"", keyword, "\": expected 1 to 79 characters"));
  }
  if (keyword.front() == ' ' || keyword.back() == ' ' || keyword.find("  ") != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "PNG text keyword \"", keyword, "\": no leading, trailing or consecutive spaces"));
  }
  for (unsigned char c : keyword) {
    if (c < 32 || (c > 126 && c < 161)) {
      return absl::InvalidArgumentError(absl::StrCat("PNG text keyword \"", keyword,
                                                     "\": expected printable Latin-1 characters"));
    }
  }
  if (entry.second.find('\0') != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("PNG text \"", keyword, "\": the text contains a NUL byte"));
  }
  return absl::OkStatus();
}

std::span<const uint8_t> AsBytes(const std::string& text) {
  return {reinterpret_cast<const uint8_t*>(text.data()), text.size()};
}

}  // namespace

absl::StatusOr<std::string> EncodePng(const RgbImage& image,
                                      const std::vector<PngTextEntry>& text) {
  constexpr int kMaxDimension = std::numeric_limits<int32_t>::max();
  if (image.width() <= 0 || image.height() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("PNG: image is ", image.width(), "x",
                                                   image.height(), ", expected at least 1x1"));
  }
  // int cannot exceed kMaxDimension, but a 2^31−1-pixel-wide row would overflow zlib's
  // 32-bit lengths long before; keep the filtered image addressable by one deflate call.
  const uint64_t filtered_bytes =
      (1 + static_cast<uint64_t>(image.width()) * kBytesPerPixel) * image.height();
  if (image.width() > kMaxDimension || filtered_bytes > std::numeric_limits<uInt>::max()) {
    return absl::InvalidArgumentError(
        absl::StrCat("PNG: image ", image.width(), "x", image.height(), " is too large to encode"));
  }
  for (const PngTextEntry& entry : text) {
    if (absl::Status status = CheckText(entry); !status.ok()) return status;
  }

  std::string out = "\x89PNG\r\n\x1a\n";
  std::string header;
  AppendBigEndian32(header, static_cast<uint32_t>(image.width()));
  AppendBigEndian32(header, static_cast<uint32_t>(image.height()));
  // Bit depth 8, colour type 2 (truecolour), compression 0, filter method 0, no interlace.
  header.append({8, 2, 0, 0, 0});
  AppendChunk(out, "IHDR", AsBytes(header));
  for (const PngTextEntry& entry : text) {
    std::string payload = entry.first;
    payload.push_back('\0');
    payload += entry.second;
    AppendChunk(out, "tEXt", AsBytes(payload));
  }
  absl::StatusOr<std::vector<uint8_t>> compressed = Deflate(FilteredScanlines(image));
  if (!compressed.ok()) return compressed.status();
  const std::span<const uint8_t> stream(*compressed);
  for (size_t offset = 0; offset < stream.size(); offset += kMaxIdatBytes) {
    AppendChunk(out, "IDAT",
                stream.subspan(offset, std::min(kMaxIdatBytes, stream.size() - offset)));
  }
  AppendChunk(out, "IEND", {});
  return out;
}

absl::Status WritePng(const std::string& path, const RgbImage& image,
                      const std::vector<PngTextEntry>& text) {
  absl::StatusOr<std::string> bytes = EncodePng(image, text);
  if (!bytes.ok()) {
    return absl::Status(bytes.status().code(), absl::StrCat(path, ": ", bytes.status().message()));
  }
  const std::string temp_path = absl::StrCat(path, ".tmp.", ::getpid());
  const int fd = ::open(temp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat(temp_path, ": cannot create: ", std::strerror(errno)));
  }
  absl::Status status;
  for (size_t written = 0; written < bytes->size();) {
    const ssize_t n = ::write(fd, bytes->data() + written, bytes->size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      status =
          absl::InternalError(absl::StrCat(temp_path, ": write failed: ", std::strerror(errno)));
      break;
    }
    written += static_cast<size_t>(n);
  }
  if (::close(fd) != 0 && status.ok()) {
    status = absl::InternalError(absl::StrCat(temp_path, ": close failed: ", std::strerror(errno)));
  }
  if (status.ok() && ::rename(temp_path.c_str(), path.c_str()) != 0) {
    status = absl::InternalError(
        absl::StrCat("cannot rename ", temp_path, " to ", path, ": ", std::strerror(errno)));
  }
  if (!status.ok()) ::unlink(temp_path.c_str());
  return status;
}

}  // namespace kvcompress
