#include "kernels/cpu/internal/merge_similar.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels/selection_order.h"

namespace kvcompress::cpu {
namespace {

double Dot(const float* a, const float* b, int dim) {
  double sum = 0;
  for (int d = 0; d < dim; ++d) sum += static_cast<double>(a[d]) * b[d];
  return sum;
}

// A merging set: its members (positions, descending as the scan found them) and its pivot.
struct MergingSet {
  std::vector<int32_t> members;
  int32_t pivot = 0;
};

// Writes the Gaussian-weighted average of the set's keys and values (fp64, rounded once to
// fp32) to key_out and value_out.
void MergeSet(const MergeSimilarOptions& options, const MergingSet& set, const HeadRows& keys,
              const HeadRows& values, float* key_out, float* value_out) {
  const int dim = keys.head_dim;
  const size_t size = set.members.size();
  const float* pivot_key = keys.row(set.pivot);
  std::vector<double> squared_distances(size);
  double sum_squared = 0;
  for (size_t m = 0; m < size; ++m) {
    const float* key = keys.row(set.members[m]);
    double sum = 0;
    for (int d = 0; d < dim; ++d) {
      const double diff = static_cast<double>(key[d]) - pivot_key[d];
      sum += diff * diff;
    }
    squared_distances[m] = sum;
    sum_squared += sum;  // the pivot adds 0
  }
  // 2σ²: fixed, or the mean squared distance of the non-pivot members (auto: σ = RMS / √2).
  const double two_sigma_squared = options.auto_sigma ? sum_squared / static_cast<double>(size - 1)
                                                      : 2 * options.sigma * options.sigma;
  std::vector<double> weights(size);
  double weight_sum = 0;
  for (size_t m = 0; m < size; ++m) {
    weights[m] = two_sigma_squared > 0 ? std::exp(-squared_distances[m] / two_sigma_squared) : 1.0;
    weight_sum += weights[m];
  }
  const double value_scale = options.scale_values_by_set_size ? static_cast<double>(size) : 1.0;
  std::vector<double> key_sum(dim, 0.0);
  std::vector<double> value_sum(dim, 0.0);
  for (size_t m = 0; m < size; ++m) {
    const double weight = weights[m] / weight_sum;
    const float* key = keys.row(set.members[m]);
    const float* value = values.row(set.members[m]);
    for (int d = 0; d < dim; ++d) {
      key_sum[d] += weight * key[d];
      value_sum[d] += weight * value[d];
    }
  }
  for (int d = 0; d < dim; ++d) {
    key_out[d] = static_cast<float>(key_sum[d]);
    value_out[d] = static_cast<float>(value_sum[d] * value_scale);
  }
}

}  // namespace

MergedHead MergeSimilarHead(const MergeSimilarOptions& options, std::span<const float> scores,
                            int64_t tokens_per_head, const HeadRows& keys, const HeadRows& values) {
  const int64_t num_tokens = keys.num_tokens;
  const int dim = keys.head_dim;
  MergedHead head;
  if (tokens_per_head >= num_tokens) {
    head.positions.resize(num_tokens);
    std::iota(head.positions.begin(), head.positions.end(), 0);
    head.merged.assign(num_tokens, 1);
    return head;
  }

  // Selection order and each token's rank in it.
  std::vector<float> order_scores(num_tokens);
  std::transform(scores.begin(), scores.end(), order_scores.begin(), SelectionScore);
  std::vector<int32_t> order(num_tokens);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return RanksBefore(order_scores[a], a, order_scores[b], b);
  });
  std::vector<int64_t> rank(num_tokens);
  for (int64_t r = 0; r < num_tokens; ++r) rank[order[r]] = r;

  const int64_t num_infinite = std::count(order_scores.begin(), order_scores.end(), INFINITY);
  const int64_t by_fraction =
      static_cast<int64_t>(std::floor(options.protect_fraction * tokens_per_head));
  const int64_t num_protected = std::min(tokens_per_head, std::max(by_fraction, num_infinite));
  std::vector<bool> is_protected(num_tokens, false);
  for (int64_t r = 0; r < num_protected; ++r) is_protected[order[r]] = true;

  // Contiguous runs of similar adjacent candidates, scanned from the last token down.
  std::vector<double> norms(num_tokens);
  for (int64_t j = 0; j < num_tokens; ++j) norms[j] = std::sqrt(Dot(keys.row(j), keys.row(j), dim));
  const auto similar_to_next = [&](int64_t j) {
    const double denominator = norms[j] * norms[j + 1];
    if (!(denominator > 0)) return false;
    return Dot(keys.row(j), keys.row(j + 1), dim) / denominator > options.similarity_threshold;
  };
  std::vector<MergingSet> sets;
  MergingSet current;
  const auto close_current = [&] {
    if (current.members.empty()) return;
    current.pivot = *std::min_element(current.members.begin(), current.members.end(),
                                      [&](int32_t a, int32_t b) { return rank[a] < rank[b]; });
    sets.push_back(std::move(current));
    current = MergingSet{};
  };
  for (int64_t j = num_tokens - 1; j >= 0; --j) {
    if (is_protected[j]) {
      close_current();
      continue;
    }
    const bool joins =
        !current.members.empty() && current.members.back() == j + 1 && similar_to_next(j);
    if (!joins) close_current();
    current.members.push_back(static_cast<int32_t>(j));
  }
  close_current();

  // Every row counts against the budget: keep the sets with the best pivots.
  const size_t set_slots = static_cast<size_t>(tokens_per_head - num_protected);
  if (sets.size() > set_slots) {
    std::nth_element(
        sets.begin(), sets.begin() + set_slots, sets.end(),
        [&](const MergingSet& a, const MergingSet& b) { return rank[a.pivot] < rank[b.pivot]; });
    sets.resize(set_slots);
  }

  // Rows in position order: protected tokens and set pivots.
  std::vector<int32_t> set_at(num_tokens, -1);  // position → index of the set it pivots
  for (size_t s = 0; s < sets.size(); ++s) set_at[sets[s].pivot] = static_cast<int32_t>(s);
  for (int64_t j = 0; j < num_tokens; ++j) {
    if (is_protected[j]) {
      head.positions.push_back(static_cast<int32_t>(j));
      head.merged.push_back(1);
    } else if (set_at[j] >= 0) {
      head.positions.push_back(static_cast<int32_t>(j));
      head.merged.push_back(static_cast<int32_t>(sets[set_at[j]].members.size()));
    }
  }
  const size_t rows = head.positions.size();
  head.keys.assign(rows * dim, 0.0f);
  head.values.assign(rows * dim, 0.0f);
  for (size_t row = 0; row < rows; ++row) {
    if (head.merged[row] == 1) continue;
    MergeSet(options, sets[set_at[head.positions[row]]], keys, values, head.keys.data() + row * dim,
             head.values.data() + row * dim);
  }
  return head;
}

}  // namespace kvcompress::cpu
