// PNG encoding of RgbImage: 8-bit truecolour (colour type 2), no interlacing, one zlib
// stream (deflate through the system zlib) split over IDAT chunks, every chunk with its
// CRC-32. Each scanline gets the filter (None, Sub, Up, Average, Paeth) with the smallest
// sum of absolute differences, the heuristic libpng uses; heatmaps are mostly flat runs
// and compress to a few percent of their raw size this way.
//
// Optional tEXt chunks carry provenance (which file, which method) inside the image.
// Pure functions; thread-safe.
#ifndef KVCOMPRESS_CLIENT_PNG_WRITER_H_
#define KVCOMPRESS_CLIENT_PNG_WRITER_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/rgb_image.h"

namespace kvcompress {

// A tEXt chunk: keyword of 1–79 Latin-1 printable characters (no leading, trailing or
// double spaces), text without NUL bytes.
using PngTextEntry = std::pair<std::string, std::string>;

// The PNG file bytes of `image`. INVALID_ARGUMENT for an empty image, a dimension above
// 2^31 − 1 or a malformed text entry; INTERNAL when zlib fails.
absl::StatusOr<std::string> EncodePng(const RgbImage& image,
                                      const std::vector<PngTextEntry>& text = {});

// Encodes and writes `path` atomically (a temporary file renamed into place), so a reader
// never sees half an image. Errors name the path.
absl::Status WritePng(const std::string& path, const RgbImage& image,
                      const std::vector<PngTextEntry>& text = {});

}  // namespace kvcompress

#endif  // KVCOMPRESS_CLIENT_PNG_WRITER_H_
