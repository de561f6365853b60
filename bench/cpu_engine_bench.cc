// How fast is the CPU reference engine per layer? (Llama-3-8B layer shapes: 8 KV heads,
// 32 query heads, D = 128, bf16, W = 64, keep 0.1.)
//
// The CPU engine is the oracle, not the product: this benchmark exists so that regressions
// in the reference show up, and so the GPU figures have a CPU point of comparison.
// Reports bytes of K+V read per second next to times.
#include <benchmark/benchmark.h>

#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "kernels/backend.h"
#include "kernels/compression_pipeline.h"
#include "kernels/dtype.h"

namespace kvcompress {
namespace {

constexpr int kKvHeads = 8;
constexpr int kQueryHeads = 32;
constexpr int kHeadDim = 128;
constexpr int kWindow = 64;

std::vector<std::byte> RandomBf16(size_t elements, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<std::byte> bytes(elements * 2);
  for (size_t i = 0; i < elements; ++i) {
    const uint16_t bits = FloatToBFloat16(normal(rng));
    std::memcpy(&bytes[i * 2], &bits, 2);
  }
  return bytes;
}

void CompressOneLayer(benchmark::State& state, ScorerKind scorer) {
  const int64_t tokens = state.range(0);
  CacheGeometry geometry{1, kKvHeads, kQueryHeads, kHeadDim, DType::kBFloat16, Layout::kHND};
  MethodSpec spec;
  spec.scorer = scorer;
  spec.budget.keep_ratio = 0.1;
  const int window = scorer == ScorerKind::kSnapKv ? kWindow : 0;
  std::mt19937 rng(42);
  const auto keys = RandomBf16(geometry.KeyValueBytes(tokens) / 2, rng);
  const auto values = RandomBf16(geometry.KeyValueBytes(tokens) / 2, rng);
  const auto queries = RandomBf16(geometry.QueryBytes(window) / 2, rng);
  std::unique_ptr<Backend> backend = MakeCpuBackend(0);
  SequenceShape shape{tokens, window, 0};
  for (auto _ : state) {
    auto pipeline = CompressionPipeline::Create(backend.get(), geometry, spec, {shape});
    LayerInput input;
    input.shape = shape;
    input.keys = keys;
    input.values = values;
    input.queries = queries;
    auto results = (*pipeline)->AddLayer(std::move(input));
    if (!results.ok()) state.SkipWithError(results.status().ToString().c_str());
    benchmark::DoNotOptimize(results);
  }
  state.SetBytesProcessed(state.iterations() * 2 * geometry.KeyValueBytes(tokens));
}

void BM_SnapKvLayer(benchmark::State& state) { CompressOneLayer(state, ScorerKind::kSnapKv); }
void BM_KnormLayer(benchmark::State& state) { CompressOneLayer(state, ScorerKind::kKnorm); }

BENCHMARK(BM_SnapKvLayer)->Arg(4096)->Arg(16384)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_KnormLayer)->Arg(4096)->Arg(16384)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
}  // namespace kvcompress

BENCHMARK_MAIN();
