#include "client/synthetic_cache.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/dtype.h"

namespace kvcompress {
namespace {

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// xoshiro256**: fast, good enough for synthetic data, and fully determined by its seed.
class Rng {
 public:
  explicit Rng(uint64_t seed) {
    for (uint64_t& word : state_) word = SplitMix64(seed);
  }

  uint64_t Next() {
    const uint64_t result = Rotl(state_[1] * 5, 7) * 9;
    const uint64_t t = state_[1] << 17;
    state_[2] ^= state_[0];
    state_[3] ^= state_[1];
    state_[1] ^= state_[2];
    state_[0] ^= state_[3];
    state_[2] ^= t;
    state_[3] = Rotl(state_[3], 45);
    return result;
  }

  // Uniform in [0, 1).
  double Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

  // Uniform integer in [0, n).
  uint64_t Below(uint64_t n) { return static_cast<uint64_t>(Uniform() * static_cast<double>(n)); }

  // Approximately standard normal: the Irwin–Hall sum of four 16-bit uniforms, rescaled.
  // One generator call per sample keeps gigabyte caches fast to make.
  float Normal() {
    const uint64_t bits = Next();
    const uint32_t sum =
        static_cast<uint32_t>(bits & 0xffff) + static_cast<uint32_t>((bits >> 16) & 0xffff) +
        static_cast<uint32_t>((bits >> 32) & 0xffff) + static_cast<uint32_t>(bits >> 48);
    // Each term is uniform on [0, 65536): mean 2·65535, variance 4·(65536² − 1)/12.
    constexpr float kMean = 2.0f * 65535.0f;
    constexpr float kInvStd = 1.7320508f / 65536.0f;
    return (static_cast<float>(sum) - kMean) * kInvStd;
  }

 private:
  static uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t state_[4];
};

// A generator for one (layer, head, stream) of one seed, independent of thread scheduling.
Rng StreamRng(uint64_t seed, uint64_t layer, uint64_t head, uint64_t stream) {
  uint64_t state = seed;
  uint64_t mixed = SplitMix64(state);
  mixed ^= layer * 0x9e3779b97f4a7c15ull;
  state = mixed;
  mixed = SplitMix64(state) ^ (head * 0xc2b2ae3d27d4eb4full);
  state = mixed;
  mixed = SplitMix64(state) ^ (stream * 0x165667b19e3779f9ull);
  return Rng(mixed);
}

void ParallelFor(int num_threads, int64_t count, const std::function<void(int64_t)>& body) {
  num_threads = static_cast<int>(std::min<int64_t>(num_threads, count));
  if (num_threads <= 1) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  std::atomic<int64_t> next{0};
  std::vector<std::thread> workers;
  workers.reserve(num_threads);
  for (int t = 0; t < num_threads; ++t) {
    workers.emplace_back([&] {
      for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) body(i);
    });
  }
  for (std::thread& worker : workers) worker.join();
}

// Rotary tables in the "rotate half" pairing: channel i pairs with i + D/2 and turns by
// position · base^(−2i/D).
struct RopeTable {
  int half = 0;
  std::vector<float> cos;  // [T, D/2]
  std::vector<float> sin;

  RopeTable(int64_t num_tokens, int head_dim, double base) : half(head_dim / 2) {
    cos.resize(static_cast<size_t>(num_tokens) * half);
    sin.resize(cos.size());
    std::vector<double> inv_freq(half);
    for (int i = 0; i < half; ++i) inv_freq[i] = std::pow(base, -2.0 * i / head_dim);
    for (int64_t t = 0; t < num_tokens; ++t) {
      for (int i = 0; i < half; ++i) {
        const double angle = static_cast<double>(t) * inv_freq[i];
        cos[t * half + i] = static_cast<float>(std::cos(angle));
        sin[t * half + i] = static_cast<float>(std::sin(angle));
      }
    }
  }

  // Rotates `row` (D floats) to position t in place.
  void Apply(float* row, int64_t t) const {
    const float* c = &cos[t * half];
    const float* s = &sin[t * half];
    for (int i = 0; i < half; ++i) {
      const float x = row[i];
      const float y = row[i + half];
      row[i] = x * c[i] - y * s[i];
      row[i + half] = x * s[i] + y * c[i];
    }
  }
};

// Converts one row of floats to `dtype` and stores it at `out`.
void StoreRow(const float* row, int head_dim, DType dtype, std::byte* out,
              std::vector<uint16_t>& scratch) {
  if (dtype == DType::kFloat32) {
    std::memcpy(out, row, static_cast<size_t>(head_dim) * sizeof(float));
    return;
  }
  scratch.resize(head_dim);
  if (dtype == DType::kBFloat16) {
    for (int c = 0; c < head_dim; ++c) scratch[c] = FloatToBFloat16(row[c]);
  } else {
    for (int c = 0; c < head_dim; ++c) scratch[c] = FloatToFloat16(row[c]);
  }
  std::memcpy(out, scratch.data(), static_cast<size_t>(head_dim) * sizeof(uint16_t));
}

// A random unit vector that is zero on the masked (outlier) channels.
std::vector<float> UnitDirection(Rng& rng, const std::vector<bool>& masked) {
  std::vector<float> direction(masked.size(), 0.0f);
  double norm = 0.0;
  for (size_t c = 0; c < masked.size(); ++c) {
    if (masked[c]) continue;
    direction[c] = rng.Normal();
    norm += static_cast<double>(direction[c]) * direction[c];
  }
  const float inv = norm > 0 ? static_cast<float>(1.0 / std::sqrt(norm)) : 0.0f;
  for (float& value : direction) value *= inv;
  return direction;
}

absl::Status ValidateOptions(const SyntheticCacheOptions& o) {
  auto bad = [](absl::string_view field, int64_t value, absl::string_view expected) {
    return absl::InvalidArgumentError(
        absl::StrCat("synthetic cache: ", field, " = ", value, ", expected ", expected));
  };
  if (o.num_layers <= 0) return bad("num_layers", o.num_layers, "> 0");
  if (o.num_kv_heads <= 0) return bad("num_kv_heads", o.num_kv_heads, "> 0");
  if (o.num_query_heads <= 0 || o.num_query_heads % o.num_kv_heads != 0) {
    return bad("num_query_heads", o.num_query_heads,
               absl::StrCat("a positive multiple of num_kv_heads ", o.num_kv_heads));
  }
  if (o.head_dim <= 0 || o.head_dim % 2 != 0) {
    return bad("head_dim", o.head_dim, "a positive even number");
  }
  if (o.num_tokens <= 0 || o.num_tokens > INT32_MAX) {
    return bad("num_tokens", o.num_tokens, "in [1, 2^31)");
  }
  if (o.num_window_queries < 0 || o.num_window_queries > o.num_tokens) {
    return bad("num_window_queries", o.num_window_queries,
               absl::StrCat("in [0, num_tokens ", o.num_tokens, "]"));
  }
  if (o.num_sinks < 0 || o.num_sinks > o.num_tokens - o.num_window_queries) {
    return bad(
        "num_sinks", o.num_sinks,
        absl::StrCat("in [0, num_tokens − window = ", o.num_tokens - o.num_window_queries, "]"));
  }
  const int64_t free_prefix = o.num_tokens - o.num_window_queries - o.num_sinks;
  if (o.salient_tokens_per_head < 0 || o.salient_tokens_per_head > free_prefix) {
    return bad("salient_tokens_per_head", o.salient_tokens_per_head,
               absl::StrCat("in [0, ", free_prefix, "] (prefix tokens after the sinks)"));
  }
  if (o.outlier_channel_pairs < 0 || o.outlier_channel_pairs > o.head_dim / 4) {
    return bad("outlier_channel_pairs", o.outlier_channel_pairs,
               absl::StrCat("in [0, head_dim/4 = ", o.head_dim / 4, "]"));
  }
  if (!(o.rope_base > 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("synthetic cache: rope_base = ", o.rope_base, ", expected > 1"));
  }
  if (o.num_threads < 0) return bad("num_threads", o.num_threads, ">= 0");
  return absl::OkStatus();
}

// Logit scale a query puts on its targets; early layers attend more diffusely.
float LayerSharpness(uint64_t seed, int layer) {
  if (layer == 0) return 0.35f;
  if (layer == 1) return 0.6f;
  Rng rng = StreamRng(seed, layer, 0xffffffffull, 7);
  return static_cast<float>(0.8 + 0.4 * rng.Uniform());
}

constexpr float kTargetLogit = 8.0f;  // logit of a fully weighted salient token, sharp layer

}  // namespace

absl::StatusOr<SyntheticCache> GenerateSyntheticCache(const SyntheticCacheOptions& options) {
  if (absl::Status status = ValidateOptions(options); !status.ok()) return status;
  const int num_layers = options.num_layers;
  const int heads = options.num_kv_heads;
  const int group = options.num_query_heads / options.num_kv_heads;
  const int head_dim = options.head_dim;
  const int half = head_dim / 2;
  const int64_t num_tokens = options.num_tokens;
  const int window = options.num_window_queries;
  const size_t elem = DTypeSize(options.dtype);
  const size_t row_bytes = static_cast<size_t>(head_dim) * elem;
  const int num_threads = options.num_threads > 0
                              ? options.num_threads
                              : std::max(1u, std::thread::hardware_concurrency());

  SyntheticCache cache;
  cache.geometry.num_layers = num_layers;
  cache.geometry.num_kv_heads = heads;
  cache.geometry.num_query_heads = options.num_query_heads;
  cache.geometry.head_dim = head_dim;
  cache.geometry.dtype = options.dtype;
  cache.geometry.layout = Layout::kHND;
  cache.shape.num_tokens = num_tokens;
  cache.shape.num_window_queries = window;
  cache.shape.num_score_heads = 0;
  cache.layers.resize(num_layers);
  cache.salient_positions.assign(num_layers, std::vector<std::vector<int64_t>>(heads));
  cache.outlier_channels.assign(num_layers, std::vector<std::vector<int>>(heads));

  // Allocation zero-fills gigabytes: spread it over the workers too.
  ParallelFor(num_threads, num_layers, [&](int64_t l) {
    LayerInput& layer = cache.layers[l];
    layer.sequence = 0;
    layer.layer = static_cast<int>(l);
    layer.shape = cache.shape;
    layer.keys.resize(cache.geometry.KeyValueBytes(num_tokens));
    layer.values.resize(layer.keys.size());
    layer.queries.resize(cache.geometry.QueryBytes(window));
  });

  const RopeTable rope(num_tokens, head_dim, options.rope_base);
  const float salient_amplitude = std::sqrt(static_cast<float>(head_dim));

  ParallelFor(num_threads, static_cast<int64_t>(num_layers) * heads, [&](int64_t task) {
    const int l = static_cast<int>(task / heads);
    const int h = static_cast<int>(task % heads);
    LayerInput& layer = cache.layers[l];
    Rng rng = StreamRng(options.seed, l, h, 0);
    std::vector<float> row(head_dim);
    std::vector<uint16_t> scratch;

    // Per-channel key scales, with outlier rotary pairs in the low-frequency half.
    std::vector<float> scale(head_dim);
    for (float& s : scale) s = std::exp(0.25f * rng.Normal());
    std::vector<bool> outlier(head_dim, false);
    std::vector<int>& outlier_channels = cache.outlier_channels[l][h];
    for (int placed = 0; placed < options.outlier_channel_pairs;) {
      const int pair = half / 2 + static_cast<int>(rng.Below(half - half / 2));
      if (outlier[pair]) continue;
      const float factor = static_cast<float>(6.0 + 6.0 * rng.Uniform());
      for (int c : {pair, pair + half}) {
        outlier[c] = true;
        scale[c] *= factor;
        outlier_channels.push_back(c);
      }
      ++placed;
    }
    std::sort(outlier_channels.begin(), outlier_channels.end());
    std::vector<float> mean(head_dim);
    for (int c = 0; c < head_dim; ++c) {
      mean[c] = scale[c] * (outlier[c] ? 0.8f : 0.25f) * rng.Normal();
    }

    // Salient positions, distinct, in [sinks, T − W).
    const int64_t first = options.num_sinks;
    const int64_t span = num_tokens - window - first;
    std::vector<int64_t>& salient = cache.salient_positions[l][h];
    std::vector<bool> taken(static_cast<size_t>(span), false);
    while (static_cast<int>(salient.size()) < options.salient_tokens_per_head) {
      const int64_t offset = static_cast<int64_t>(rng.Below(static_cast<uint64_t>(span)));
      if (taken[offset]) continue;
      taken[offset] = true;
      salient.push_back(first + offset);
    }
    std::sort(salient.begin(), salient.end());
    const int num_salient = static_cast<int>(salient.size());
    std::vector<std::vector<float>> salient_dir(num_salient);
    for (auto& direction : salient_dir) direction = UnitDirection(rng, outlier);
    const std::vector<float> sink_dir = UnitDirection(rng, outlier);
    const float sink_amplitude = 0.9f * salient_amplitude;

    // Keys: [T, D] rows of head h.
    Rng key_rng = StreamRng(options.seed, l, h, 1);
    std::byte* keys = layer.keys.data() + static_cast<size_t>(h) * num_tokens * row_bytes;
    int next_salient = 0;
    for (int64_t t = 0; t < num_tokens; ++t) {
      if (t < options.num_sinks) {
        for (int c = 0; c < head_dim; ++c) {
          row[c] = mean[c] + sink_amplitude * sink_dir[c] + 0.3f * scale[c] * key_rng.Normal();
        }
      } else {
        for (int c = 0; c < head_dim; ++c) row[c] = mean[c] + scale[c] * key_rng.Normal();
        if (next_salient < num_salient && salient[next_salient] == t) {
          const std::vector<float>& direction = salient_dir[next_salient];
          for (int c = 0; c < head_dim; ++c) row[c] += salient_amplitude * direction[c];
          ++next_salient;
        }
      }
      rope.Apply(row.data(), t);
      StoreRow(row.data(), head_dim, options.dtype, keys + t * row_bytes, scratch);
    }

    // Values: [T, D] rows of head h.
    Rng value_rng = StreamRng(options.seed, l, h, 2);
    const float value_scale = std::exp(0.3f * value_rng.Normal());
    std::byte* values = layer.values.data() + static_cast<size_t>(h) * num_tokens * row_bytes;
    for (int64_t t = 0; t < num_tokens; ++t) {
      for (int c = 0; c < head_dim; ++c) row[c] = value_scale * value_rng.Normal();
      StoreRow(row.data(), head_dim, options.dtype, values + t * row_bytes, scratch);
    }

    if (window == 0) return;
    // Post-RoPE targets: what a query must point at to meet each salient key and the sinks.
    std::vector<std::vector<float>> salient_target(num_salient);
    for (int j = 0; j < num_salient; ++j) {
      salient_target[j] = salient_dir[j];
      rope.Apply(salient_target[j].data(), salient[j]);
    }
    std::vector<float> sink_target(head_dim, 0.0f);
    for (int64_t t = 0; t < options.num_sinks; ++t) {
      std::vector<float> rotated = sink_dir;
      rope.Apply(rotated.data(), t);
      for (int c = 0; c < head_dim; ++c) rotated[c] /= static_cast<float>(options.num_sinks);
      for (int c = 0; c < head_dim; ++c) sink_target[c] += rotated[c];
    }

    // Queries: the G heads of this group, [W, D] each. Logit of a salient token whose
    // weight is α: α · sharpness · kTargetLogit.
    const float gain = LayerSharpness(options.seed, l) * kTargetLogit *
                       std::sqrt(static_cast<float>(head_dim)) / salient_amplitude;
    Rng query_rng = StreamRng(options.seed, l, h, 3);
    const float noise = 0.3f * gain / std::sqrt(static_cast<float>(head_dim));
    for (int g = 0; g < group; ++g) {
      const int query_head = h * group + g;
      // Each query head follows a few of its group's salient tokens.
      const int active = std::min(num_salient, 4);
      std::vector<int> chosen;
      std::vector<float> weight;
      while (static_cast<int>(chosen.size()) < active) {
        const int j = static_cast<int>(query_rng.Below(num_salient));
        if (std::find(chosen.begin(), chosen.end(), j) != chosen.end()) continue;
        chosen.push_back(j);
        weight.push_back(static_cast<float>(0.6 + 0.6 * query_rng.Uniform()));
      }
      const float sink_weight = static_cast<float>(0.8 + 0.2 * query_rng.Uniform());
      std::byte* queries =
          layer.queries.data() + static_cast<size_t>(query_head) * window * row_bytes;
      for (int w = 0; w < window; ++w) {
        for (int c = 0; c < head_dim; ++c) {
          row[c] = outlier[c] ? 0.0f : noise * query_rng.Normal();
        }
        if (options.num_sinks > 0) {
          const float a = gain * sink_weight * (1.0f + 0.1f * query_rng.Normal());
          for (int c = 0; c < head_dim; ++c) row[c] += a * sink_target[c];
        }
        for (size_t k = 0; k < chosen.size(); ++k) {
          const float a = gain * weight[k] * std::max(0.0f, 1.0f + 0.15f * query_rng.Normal());
          const std::vector<float>& target = salient_target[chosen[k]];
          for (int c = 0; c < head_dim; ++c) row[c] += a * target[c];
        }
        StoreRow(row.data(), head_dim, options.dtype, queries + w * row_bytes, scratch);
      }
    }
  });
  return cache;
}

}  // namespace kvcompress
