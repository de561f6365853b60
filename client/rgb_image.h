// RgbImage: an 8-bit RGB raster in memory, row-major, 3 bytes per pixel, the input of the
// PNG writer and the canvas of the heatmap and font units.
//
// Drawing calls clip to the image: coordinates outside it are ignored, never an error, so
// callers can place labels near edges without bounds arithmetic. A value type (copying
// copies the pixels); thread-compatible.
#ifndef KVCOMPRESS_CLIENT_RGB_IMAGE_H_
#define KVCOMPRESS_CLIENT_RGB_IMAGE_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace kvcompress {

struct Rgb {
  uint8_t r = 0;
  uint8_t g = 0;
  uint8_t b = 0;

  friend bool operator==(const Rgb&, const Rgb&) = default;
};

inline constexpr Rgb kWhite{255, 255, 255};
inline constexpr Rgb kBlack{0, 0, 0};

class RgbImage final {
 public:
  RgbImage() = default;
  // Negative sizes are treated as 0.
  RgbImage(int width, int height, Rgb fill = kWhite)
      : width_(std::max(width, 0)), height_(std::max(height, 0)) {
    pixels_.resize(static_cast<size_t>(width_) * height_ * 3);
    FillRect(0, 0, width_, height_, fill);
  }

  int width() const { return width_; }
  int height() const { return height_; }
  bool Contains(int x, int y) const { return x >= 0 && y >= 0 && x < width_ && y < height_; }

  // The pixel at (x, y); requires Contains(x, y).
  Rgb At(int x, int y) const {
    const uint8_t* p = &pixels_[Offset(x, y)];
    return Rgb{p[0], p[1], p[2]};
  }
  void Set(int x, int y, Rgb color) {
    if (!Contains(x, y)) return;
    uint8_t* p = &pixels_[Offset(x, y)];
    p[0] = color.r;
    p[1] = color.g;
    p[2] = color.b;
  }
  // Fills [x, x + w) × [y, y + h), clipped.
  void FillRect(int x, int y, int w, int h, Rgb color) {
    const int x0 = std::max(x, 0), x1 = std::min(x + w, width_);
    const int y0 = std::max(y, 0), y1 = std::min(y + h, height_);
    for (int yy = y0; yy < y1; ++yy) {
      for (int xx = x0; xx < x1; ++xx) Set(xx, yy, color);
    }
  }

  // Row `y` as width × 3 bytes; requires 0 ≤ y < height.
  std::span<const uint8_t> Row(int y) const {
    return std::span<const uint8_t>(pixels_).subspan(Offset(0, y), static_cast<size_t>(width_) * 3);
  }
  std::span<const uint8_t> pixels() const { return pixels_; }

 private:
  size_t Offset(int x, int y) const { return (static_cast<size_t>(y) * width_ + x) * 3; }

  int width_ = 0;
  int height_ = 0;
  std::vector<uint8_t> pixels_;
};

}  // namespace kvcompress

#endif  // KVCOMPRESS_CLIENT_RGB_IMAGE_H_
