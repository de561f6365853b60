// A 5×7 pixel bitmap font for labels drawn into RgbImage (axis ticks, titles, legends), so
// images explain themselves without a font library.
//
// Covers digits, A–Z (lower case is drawn as upper case) and the punctuation
// ` .,:;=-+_()%/?*<>[]#`; any other character is drawn as `?`. Each glyph sits in a cell of
// kGlyphAdvance × kGlyphHeight at scale 1; `scale` multiplies every dot into a square.
// Drawing clips to the image. Pure functions; thread-safe.
#ifndef KVCOMPRESS_CLIENT_BITMAP_FONT_H_
#define KVCOMPRESS_CLIENT_BITMAP_FONT_H_

#include <string_view>

#include "client/rgb_image.h"

namespace kvcompress {

inline constexpr int kGlyphWidth = 5;
inline constexpr int kGlyphHeight = 7;
inline constexpr int kGlyphAdvance = 6;  // one column of spacing

// Width in pixels of `text` at `scale` (no trailing spacing column); 0 for empty text.
int TextWidth(std::string_view text, int scale);
inline int TextHeight(int scale) { return kGlyphHeight * scale; }

// Draws `text` with its top-left corner at (x, y).
void DrawText(RgbImage& image, int x, int y, std::string_view text, int scale, Rgb color);

}  // namespace kvcompress

#endif  // KVCOMPRESS_CLIENT_BITMAP_FONT_H_
