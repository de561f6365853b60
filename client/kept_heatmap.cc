#include "client/kept_heatmap.h"

#include <algorithm>
#include <array>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "client/bitmap_font.h"

namespace kvcompress {
namespace {

// matplotlib's viridis at 0, 0.1, …, 1; linear in between is indistinguishable from the
// 256-entry table at the bin resolutions used here.
constexpr std::array<Rgb, 11> kViridis = {{{68, 1, 84},
                                           {72, 36, 117},
                                           {65, 68, 135},
                                           {53, 95, 141},
                                           {42, 120, 142},
                                           {33, 145, 140},
                                           {34, 168, 132},
                                           {68, 191, 112},
                                           {122, 209, 81},
                                           {189, 223, 38},
                                           {253, 231, 37}}};

// Annotation layout, in pixels. Text is drawn at scale 2 (10×14 glyphs): scale 1 is too
// small to read on a high-density screen next to a 1000-px plot.
constexpr int kTextScale = 2;
constexpr int kPad = 12;
constexpr int kTickLength = 5;
constexpr int kColorBarWidth = 256;
constexpr int kColorBarHeight = 14;
constexpr int kTargetPlotHeight = 800;
constexpr int kMinPlotWidth = 512;  // short caches get wider columns, not a thumbnail
constexpr Rgb kInk{32, 32, 32};
constexpr Rgb kFaint{96, 96, 96};

absl::Status CheckLayer(const LayerResult& result, int layer, int num_heads, int64_t num_tokens) {
  auto error = [layer](std::string message) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, ": ", message));
  };
  if (static_cast<int>(result.kept.size()) != num_heads) {
    return error(absl::StrCat("kept has ", result.kept.size(), " heads, expected ", num_heads,
                              " like layer 0"));
  }
  if (result.offsets.size() != result.kept.size() + 1 || result.offsets.front() != 0) {
    return error(absl::StrCat("offsets has ", result.offsets.size(), " entries, expected ",
                              num_heads + 1, " starting at 0"));
  }
  for (int h = 0; h < num_heads; ++h) {
    if (result.kept[h] < 0 || result.offsets[h + 1] - result.offsets[h] != result.kept[h]) {
      return error(absl::StrCat("head ", h, ": kept ", result.kept[h], " does not match offsets ",
                                result.offsets[h], "..", result.offsets[h + 1]));
    }
  }
  if (static_cast<int64_t>(result.positions.size()) != result.offsets.back()) {
    return error(absl::StrCat("positions has ", result.positions.size(), " entries, expected ",
                              result.offsets.back()));
  }
  for (int h = 0; h < num_heads; ++h) {
    for (int32_t i = result.offsets[h]; i < result.offsets[h + 1]; ++i) {
      const int32_t position = result.positions[i];
      if (position < 0 || position >= num_tokens ||
          (i > result.offsets[h] && position <= result.positions[i - 1])) {
        return error(absl::StrCat("head ", h, " row ", i - result.offsets[h], ": position ",
                                  position, " is outside [0, ", num_tokens, ") or not ascending"));
      }
    }
  }
  return absl::OkStatus();
}

// The largest of 1, 2, 5 × 10^k whose tick labels, spaced by `step`, do not collide.
int64_t TickStep(int64_t num_tokens, int plot_width) {
  const int label_width = TextWidth(absl::StrCat(num_tokens), kTextScale) + 3 * kPad;
  const int64_t max_ticks = std::max(1, plot_width / label_width);
  for (int64_t magnitude = 1;; magnitude *= 10) {
    for (int64_t multiple : {1, 2, 5}) {
      const int64_t step = multiple * magnitude;
      if (num_tokens / step <= max_ticks) return step;
    }
  }
}

// Draws `text` centred on x, kept inside the image.
void DrawCentered(RgbImage& image, int center_x, int y, const std::string& text, Rgb color) {
  const int width = TextWidth(text, kTextScale);
  const int x = std::clamp(center_x - width / 2, 0, std::max(0, image.width() - width));
  DrawText(image, x, y, text, kTextScale, color);
}

}  // namespace

Rgb ViridisColor(double fraction) {
  const double x = std::clamp(std::isnan(fraction) ? 0.0 : fraction, 0.0, 1.0) * 10.0;
  const int i = std::min(static_cast<int>(x), 9);
  const double t = x - i;
  auto mix = [t](uint8_t a, uint8_t b) {
    return static_cast<uint8_t>(std::lround(a + (double(b) - double(a)) * t));
  };
  const Rgb& lo = kViridis[i];
  const Rgb& hi = kViridis[i + 1];
  return Rgb{mix(lo.r, hi.r), mix(lo.g, hi.g), mix(lo.b, hi.b)};
}

absl::Status ValidateKeptPositions(std::span<const LayerResult> layers, int64_t num_tokens) {
  if (layers.empty()) return absl::InvalidArgumentError("no layers");
  if (num_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("num_tokens ", num_tokens, ", expected >= 1"));
  }
  const int num_heads = static_cast<int>(layers[0].kept.size());
  if (num_heads < 1) return absl::InvalidArgumentError("layer 0 has no heads");
  for (size_t l = 0; l < layers.size(); ++l) {
    absl::Status status = CheckLayer(layers[l], static_cast<int>(l), num_heads, num_tokens);
    if (!status.ok()) return status;
  }
  return absl::OkStatus();
}

absl::StatusOr<KeptFractions> BinKeptPositions(std::span<const LayerResult> layers,
                                               int64_t num_tokens, int max_columns) {
  if (max_columns < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_columns ", max_columns, ", expected >= 1"));
  }
  if (absl::Status status = ValidateKeptPositions(layers, num_tokens); !status.ok()) return status;
  KeptFractions out;
  out.num_layers = static_cast<int>(layers.size());
  out.num_heads = static_cast<int>(layers[0].kept.size());
  out.num_tokens = num_tokens;
  out.num_columns = static_cast<int>(std::min<int64_t>(num_tokens, max_columns));
  out.values.assign(static_cast<size_t>(out.num_layers) * out.num_heads * out.num_columns, 0.0f);

  std::vector<int64_t> counts(out.num_columns);
  for (int l = 0; l < out.num_layers; ++l) {
    const LayerResult& result = layers[l];
    for (int h = 0; h < out.num_heads; ++h) {
      std::fill(counts.begin(), counts.end(), 0);
      for (int32_t i = result.offsets[h]; i < result.offsets[h + 1]; ++i) {
        ++counts[out.ColumnOf(result.positions[i])];
      }
      float* row = &out.values[(static_cast<size_t>(l) * out.num_heads + h) * out.num_columns];
      for (int c = 0; c < out.num_columns; ++c) {
        const int64_t size = out.ColumnStart(c + 1) - out.ColumnStart(c);
        row[c] = static_cast<float>(static_cast<double>(counts[c]) / static_cast<double>(size));
      }
    }
  }
  return out;
}

absl::StatusOr<KeptHeatmap> RenderKeptHeatmap(std::span<const LayerResult> layers,
                                              int64_t num_tokens,
                                              const KeptHeatmapOptions& options) {
  if (options.row_pixels < 0 || options.row_pixels > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("row_pixels ", options.row_pixels, ", expected in [0, 256]"));
  }
  absl::StatusOr<KeptFractions> fractions =
      BinKeptPositions(layers, num_tokens, options.max_columns);
  if (!fractions.ok()) return fractions.status();

  KeptHeatmap map;
  map.fractions = *std::move(fractions);
  const KeptFractions& f = map.fractions;
  const int rows = f.num_layers * f.num_heads;
  map.row_pixels =
      options.row_pixels > 0 ? options.row_pixels : std::clamp(kTargetPlotHeight / rows, 2, 24);
  map.layer_gap_pixels = f.num_layers > 1 ? 1 : 0;
  map.column_pixels = std::max(1, kMinPlotWidth / f.num_columns);

  const int text_height = TextHeight(kTextScale);
  const std::string last_layer_label = absl::StrCat("L", f.num_layers - 1);
  const int64_t fewest = f.num_tokens / f.num_columns;
  const int64_t most = (f.num_tokens + f.num_columns - 1) / f.num_columns;
  const std::string axis_caption =
      absl::StrCat("TOKEN POSITION  (T=", f.num_tokens, ", ",
                   fewest == most ? absl::StrCat(most) : absl::StrCat(fewest, "-", most),
                   most == 1 ? " TOKEN" : " TOKENS", " PER COLUMN)");
  const std::string legend =
      absl::StrCat("FRACTION KEPT.  ROWS: LAYER, THEN KV HEAD 0-", f.num_heads - 1, " TOP DOWN");
  if (options.annotate) {
    map.plot_left = kPad + TextWidth(last_layer_label, kTextScale) + kPad / 2;
    map.plot_top = kPad + (options.title.empty() ? 0 : text_height + kPad);
  }
  const int plot_right = map.plot_left + map.plot_width();
  const int plot_bottom = map.plot_top + map.plot_height();
  int width = plot_right;
  int height = plot_bottom;
  // Annotation rows below the plot: ticks and their labels, the axis caption, the colour
  // bar with its labels beside the legend.
  const int tick_label_top = plot_bottom + kTickLength + 3;
  const int caption_top = tick_label_top + text_height + kPad / 2;
  const int bar_top = caption_top + text_height + kPad;
  const int bar_label_top = bar_top + kColorBarHeight + 3;
  if (options.annotate) {
    const int bar_left = map.plot_left;
    width = std::max({plot_right, map.plot_left + TextWidth(axis_caption, kTextScale),
                      bar_left + kColorBarWidth + kPad + TextWidth(legend, kTextScale)}) +
            kPad;
    width = std::max(width, kPad + TextWidth(options.title, kTextScale) + kPad);
    height = bar_label_top + text_height + kPad;
  }
  map.image = RgbImage(width, height, kWhite);
  RgbImage& image = map.image;

  for (int l = 0; l < f.num_layers; ++l) {
    for (int h = 0; h < f.num_heads; ++h) {
      const int top = map.RowTop(l, h);
      for (int c = 0; c < f.num_columns; ++c) {
        image.FillRect(map.ColumnLeft(c), top, map.column_pixels, map.row_pixels,
                       ViridisColor(f.At(l, h, c)));
      }
    }
  }
  if (!options.annotate) return map;

  DrawText(image, kPad, kPad, options.title, kTextScale, kInk);

  // Layer labels, right-aligned against the plot, as many as fit without overlapping.
  const int band = f.num_heads * map.row_pixels + map.layer_gap_pixels;
  const int every = std::max(1, (text_height + 4 + band - 1) / band);
  for (int l = 0; l < f.num_layers; l += every) {
    const std::string label = absl::StrCat("L", l);
    const int center = map.RowTop(l, 0) + (f.num_heads * map.row_pixels) / 2;
    DrawText(image, map.plot_left - kPad / 2 - TextWidth(label, kTextScale),
             center - text_height / 2, label, kTextScale, kInk);
  }

  // Token axis: ticks at multiples of a round step, and one at T.
  const int64_t step = TickStep(f.num_tokens, map.plot_width());
  auto tick_x = [&](int64_t token) {
    return map.plot_left +
           static_cast<int>(token * f.num_columns / f.num_tokens) * map.column_pixels;
  };
  for (int64_t token = 0; token <= f.num_tokens; token += step) {
    const int x = token == f.num_tokens ? plot_right - 1 : tick_x(token);
    image.FillRect(x, plot_bottom, 1, kTickLength, kInk);
    // Skip a round tick that would crowd the label at T.
    if (token != f.num_tokens && f.num_tokens - token < step / 2) continue;
    DrawCentered(image, x, tick_label_top, absl::StrCat(token), kInk);
  }
  if (f.num_tokens % step != 0) {
    image.FillRect(plot_right - 1, plot_bottom, 1, kTickLength, kInk);
    DrawCentered(image, plot_right - 1, tick_label_top, absl::StrCat(f.num_tokens), kInk);
  }
  DrawCentered(image, map.plot_left + map.plot_width() / 2, caption_top, axis_caption, kFaint);

  // Colour bar 0 … 1 with the legend beside it.
  const int bar_left = map.plot_left;
  for (int x = 0; x < kColorBarWidth; ++x) {
    image.FillRect(bar_left + x, bar_top, 1, kColorBarHeight,
                   ViridisColor(static_cast<double>(x) / (kColorBarWidth - 1)));
  }
  DrawText(image, bar_left, bar_label_top, "0", kTextScale, kInk);
  DrawCentered(image, bar_left + kColorBarWidth / 2, bar_label_top, "0.5", kInk);
  DrawText(image, bar_left + kColorBarWidth - TextWidth("1", kTextScale), bar_label_top, "1",
           kTextScale, kInk);
  DrawText(image, bar_left + kColorBarWidth + kPad, bar_top + (kColorBarHeight - text_height) / 2,
           legend, kTextScale, kInk);
  return map;
}

}  // namespace kvcompress
