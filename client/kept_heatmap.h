// Kept-token heatmaps: which original positions every (layer, KV head) of a compressed
// cache kept, drawn as an image people can read at a glance.
//
// Geometry of the picture: one row band per (layer, head), layers top to bottom and heads
// in order inside a layer, a white gap between layers; x is the token position, binned into
// at most `max_columns` columns; the colour of a cell is the fraction of its bin's tokens
// the head kept on the viridis scale (dark purple: all dropped, yellow: all kept). Viridis
// is perceptually uniform and readable with the common colour-vision deficiencies.
// Annotated images add a title, layer labels, a token axis with ticks, and a colour bar.
//
// Positions are validated (inside [0, T), strictly ascending within a head), so a damaged
// result is an INVALID_ARGUMENT naming the layer and head, never a wrong picture.
// Pure functions; thread-safe.
#ifndef KVCOMPRESS_CLIENT_KEPT_HEATMAP_H_
#define KVCOMPRESS_CLIENT_KEPT_HEATMAP_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/rgb_image.h"
#include "kernels/layer_result.h"

namespace kvcompress {

// Per (layer, head, column): the fraction of the column's tokens that were kept.
// Column c holds tokens [ColumnStart(c), ColumnStart(c + 1)): every column holds
// ⌊T/C⌋ or ⌈T/C⌉ tokens, never zero (C = min(T, max_columns)).
struct KeptFractions {
  int num_layers = 0;
  int num_heads = 0;
  int num_columns = 0;
  int64_t num_tokens = 0;
  std::vector<float> values;  // [num_layers, num_heads, num_columns]

  float At(int layer, int head, int column) const {
    return values[(static_cast<size_t>(layer) * num_heads + head) * num_columns + column];
  }
  int64_t ColumnStart(int column) const {
    return (static_cast<int64_t>(column) * num_tokens + num_columns - 1) / num_columns;
  }
  // The column holding token `position` (0 ≤ position < T).
  int ColumnOf(int64_t position) const {
    return static_cast<int>(position * num_columns / num_tokens);
  }
};

// Checks that `layers` (one sequence, layers[l] is layer l, ragged) describe kept sets of a
// T = num_tokens sequence: at least one layer, the same number (≥ 1) of heads in every
// layer, kept/offsets/positions that agree, positions inside [0, T) and strictly ascending
// within a head. INVALID_ARGUMENT naming the layer and head otherwise.
absl::Status ValidateKeptPositions(std::span<const LayerResult> layers, int64_t num_tokens);

// Bins the kept positions of `layers`. INVALID_ARGUMENT for max_columns < 1 or what
// ValidateKeptPositions rejects.
absl::StatusOr<KeptFractions> BinKeptPositions(std::span<const LayerResult> layers,
                                               int64_t num_tokens, int max_columns);

// The viridis colour of `fraction` (clamped to [0, 1]): 0 → #440154, 1 → #FDE725.
Rgb ViridisColor(double fraction);

struct KeptHeatmapOptions {
  int max_columns = 1024;  // token bins along x; default 1024
  // Pixel height of one head's row; 0 picks 2–24 px so the plot is about 800 px tall
  // (32 layers × 8 heads get 3 px rows).
  int row_pixels = 0;
  // Title, labels, token axis and colour bar around the plot. Default on; off gives the
  // bare plot with no margins.
  bool annotate = true;
  std::string title;  // first line of an annotated image; may be empty
};

struct KeptHeatmap {
  RgbImage image;
  KeptFractions fractions;
  // Where the plot sits in the image: cell (layer, head, column) covers
  // [ColumnLeft(column), +column_pixels) × [RowTop(layer, head), +row_pixels).
  int plot_left = 0;
  int plot_top = 0;
  int column_pixels = 1;
  int row_pixels = 1;
  int layer_gap_pixels = 0;

  int ColumnLeft(int column) const { return plot_left + column * column_pixels; }
  int RowTop(int layer, int head) const {
    return plot_top + layer * (fractions.num_heads * row_pixels + layer_gap_pixels) +
           head * row_pixels;
  }
  int plot_width() const { return fractions.num_columns * column_pixels; }
  int plot_height() const {
    return fractions.num_layers * (fractions.num_heads * row_pixels + layer_gap_pixels) -
           layer_gap_pixels;
  }
};

// Bins (as BinKeptPositions, same errors) and draws. INVALID_ARGUMENT as well for
// row_pixels outside [0, 256].
absl::StatusOr<KeptHeatmap> RenderKeptHeatmap(std::span<const LayerResult> layers,
                                              int64_t num_tokens,
                                              const KeptHeatmapOptions& options = {});

}  // namespace kvcompress

#endif  // KVCOMPRESS_CLIENT_KEPT_HEATMAP_H_
