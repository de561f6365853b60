// How close is the CUDA backend to the memory floor? One command:
//
//   gpu_bench [--tokens=4096,16384,32768,65536,131072] [--layers=32] [--repeats=7]
//             [--methods=snapkv,knorm,streaming,pyramidkv,adakv]
//
// Llama-3.1-8B shapes (32 query / 8 KV heads, D = 128, bf16, HND, 64 window queries, keep
// 0.1) on device-resident caches (CudaCompressor, as a CUDA IPC or NCCL transport hands them
// over). For each T and method: the median time of one layer alone and of the whole model in
// one call; the floor — the bytes the method must move (K read once where the method reads
// it, the window queries, kept K and V rows read and written) over the device-to-device copy
// bandwidth measured in the same run — and the ratio to it; the stage split of the whole-model
// call (attention + scores, selection, gather). Prints Markdown tables for bench/RESULTS.md.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench/gpu/random_fill.h"
#include "kernels/budget_math.h"
#include "kernels/cuda/cuda_compressor.h"
#include "kernels/method_spec.h"
#include "kernels/snapkv_window.h"

namespace kvcompress::bench {
namespace {

#define BENCH_CHECK(expr)                                                              \
  do {                                                                                 \
    const cudaError_t bench_error = (expr);                                            \
    if (bench_error != cudaSuccess) {                                                  \
      std::fprintf(stderr, "%s failed: %s\n", #expr, cudaGetErrorString(bench_error)); \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (false)

struct Options {
  std::vector<int64_t> tokens = {4096, 16384, 32768, 65536, 131072};
  std::vector<std::string> methods = {"snapkv", "pyramidkv", "adakv", "knorm", "streaming"};
  int layers = 32;
  int repeats = 7;
  int kv_heads = 8;
  int query_heads = 32;
  int head_dim = 128;
  int window = 64;
  double keep = 0.1;
};

std::vector<std::string> Split(const std::string& text) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t comma = text.find(',', start);
    parts.push_back(
        text.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return parts;
}

Options ParseOptions(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&](const char* name) -> const char* {
      const size_t length = std::strlen(name);
      return arg.compare(0, length, name) == 0 ? arg.c_str() + length : nullptr;
    };
    if (const char* v = value("--tokens=")) {
      options.tokens.clear();
      for (const std::string& part : Split(v)) options.tokens.push_back(std::stoll(part));
    } else if (const char* v = value("--methods=")) {
      options.methods = Split(v);
    } else if (const char* v = value("--layers=")) {
      options.layers = std::atoi(v);
    } else if (const char* v = value("--repeats=")) {
      options.repeats = std::atoi(v);
    } else {
      std::fprintf(stderr, "unknown argument %s\n", arg.c_str());
      std::exit(2);
    }
  }
  return options;
}

MethodSpec SpecFor(const std::string& method, double keep) {
  MethodSpec spec;
  spec.budget.use_ratio = true;
  spec.budget.keep_ratio = keep;
  if (method == "knorm") spec.scorer = ScorerKind::kKnorm;
  if (method == "streaming") spec.scorer = ScorerKind::kStreaming;
  if (method == "pyramidkv") spec.layer_budget = LayerBudgetKind::kPyramid;
  if (method == "adakv") spec.head_budget = HeadBudgetKind::kAdaptive;
  return spec;
}

// Tokens per head layer `layer` keeps: the uniform n, or PyramidKV's layer budget (as
// CompressionPipeline::LayerTokenBudget computes it for snapkv with `window` queries).
int64_t LayerTokens(const MethodSpec& spec, int64_t tokens, int window, int layer, int layers) {
  const int64_t uniform = TokensToKeep(spec.budget, tokens);
  if (spec.layer_budget != LayerBudgetKind::kPyramid || uniform >= tokens) return uniform;
  const int64_t budget = PyramidTokenBudget(
      static_cast<double>(tokens) * spec.budget.keep_ratio, tokens,
      EffectiveWindowSize(spec.snapkv.window_size, window), layer, layers, spec.pyramid.beta);
  return std::clamp<int64_t>(budget, 1, tokens);
}

// Device-to-device copy bandwidth, bytes read plus written per second.
double CopyBandwidth() {
  const size_t bytes = size_t{1} << 30;
  void* source = nullptr;
  void* target = nullptr;
  BENCH_CHECK(cudaMalloc(&source, bytes));
  BENCH_CHECK(cudaMalloc(&target, bytes));
  BENCH_CHECK(FillRandom(source, bytes / 2, DType::kBFloat16, 7, 1.0f));
  cudaEvent_t start, stop;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  // Warm-up first: clocks ramp up from idle.
  for (int i = 0; i < 150; ++i) {
    BENCH_CHECK(cudaMemcpyAsync(target, source, bytes, cudaMemcpyDeviceToDevice));
  }
  std::vector<float> times;
  for (int i = 0; i < 12; ++i) {
    BENCH_CHECK(cudaEventRecord(start));
    BENCH_CHECK(cudaMemcpyAsync(target, source, bytes, cudaMemcpyDeviceToDevice));
    BENCH_CHECK(cudaEventRecord(stop));
    BENCH_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    BENCH_CHECK(cudaEventElapsedTime(&ms, start, stop));
    if (i >= 2) times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  BENCH_CHECK(cudaFree(source));
  BENCH_CHECK(cudaFree(target));
  return 2.0 * bytes / (times[times.size() / 2] * 1e-3);
}

struct Timing {
  double total_ms = 0;
  double score_ms = 0;
  double select_ms = 0;
  double gather_ms = 0;
};

// Median over `repeats` calls (after two warm-ups); call i runs job set i mod |job_sets|, so
// that single layers rotate through different data instead of timing the L2.
Timing TimeCompress(CudaCompressor& compressor, const CacheGeometry& geometry,
                    const MethodSpec& spec,
                    const std::vector<std::vector<DeviceLayerJob>>& job_sets, cudaStream_t stream,
                    int repeats) {
  cudaEvent_t start, stop;
  StageEvents stages;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  BENCH_CHECK(cudaEventCreate(&stages.scored));
  BENCH_CHECK(cudaEventCreate(&stages.selected));
  BENCH_CHECK(cudaEventCreate(&stages.gathered));
  std::vector<Timing> runs;
  for (int i = 0; i < repeats + 2; ++i) {
    BENCH_CHECK(cudaEventRecord(start, stream));
    absl::StatusOr<DeviceBatchResult> result =
        compressor.Compress(geometry, spec, job_sets[i % job_sets.size()], stream, &stages);
    if (!result.ok()) {
      std::fprintf(stderr, "Compress failed: %s\n", result.status().ToString().c_str());
      std::exit(1);
    }
    BENCH_CHECK(cudaEventRecord(stop, stream));
    BENCH_CHECK(cudaEventSynchronize(stop));
    Timing timing;
    float ms = 0;
    BENCH_CHECK(cudaEventElapsedTime(&ms, start, stop));
    timing.total_ms = ms;
    BENCH_CHECK(cudaEventElapsedTime(&ms, start, stages.scored));
    timing.score_ms = ms;
    BENCH_CHECK(cudaEventElapsedTime(&ms, stages.scored, stages.selected));
    timing.select_ms = ms;
    BENCH_CHECK(cudaEventElapsedTime(&ms, stages.selected, stages.gathered));
    timing.gather_ms = ms;
    if (i >= 2) runs.push_back(timing);
  }
  std::sort(runs.begin(), runs.end(),
            [](const Timing& a, const Timing& b) { return a.total_ms < b.total_ms; });
  for (cudaEvent_t event : {start, stop, stages.scored, stages.selected, stages.gathered}) {
    BENCH_CHECK(cudaEventDestroy(event));
  }
  return runs[runs.size() / 2];
}

struct Row {
  int64_t tokens;
  std::string method;
  Timing layer;
  Timing model;
  double floor_bytes_model;
  double floor_ms_model;
};

int Main(int argc, char** argv) {
  const Options options = ParseOptions(argc, argv);
  BENCH_CHECK(cudaSetDevice(0));
  cudaDeviceProp props;
  BENCH_CHECK(cudaGetDeviceProperties(&props, 0));
  const double bandwidth = CopyBandwidth();
  std::printf("device: %s, %d SMs, %.0f MB L2; device-to-device copy %.0f GB/s (read + write)\n",
              props.name, props.multiProcessorCount, props.l2CacheSize / 1e6, bandwidth / 1e9);

  CacheGeometry geometry;
  geometry.num_layers = options.layers;
  geometry.num_kv_heads = options.kv_heads;
  geometry.num_query_heads = options.query_heads;
  geometry.head_dim = options.head_dim;
  geometry.dtype = DType::kBFloat16;
  geometry.layout = Layout::kHND;
  const int64_t max_tokens = *std::max_element(options.tokens.begin(), options.tokens.end());
  const size_t kv_bytes = geometry.KeyValueBytes(max_tokens);
  const size_t query_bytes = geometry.QueryBytes(options.window);
  std::vector<std::byte*> keys(options.layers), values(options.layers), queries(options.layers);
  for (int l = 0; l < options.layers; ++l) {
    BENCH_CHECK(cudaMalloc(reinterpret_cast<void**>(&keys[l]), kv_bytes));
    BENCH_CHECK(cudaMalloc(reinterpret_cast<void**>(&values[l]), kv_bytes));
    BENCH_CHECK(cudaMalloc(reinterpret_cast<void**>(&queries[l]), query_bytes));
    BENCH_CHECK(FillRandom(keys[l], kv_bytes / 2, geometry.dtype, 3 * l + 1, 1.0f));
    BENCH_CHECK(FillRandom(values[l], kv_bytes / 2, geometry.dtype, 3 * l + 2, 1.0f));
    BENCH_CHECK(FillRandom(queries[l], query_bytes / 2, geometry.dtype, 3 * l + 3, 2.0f));
  }
  BENCH_CHECK(cudaDeviceSynchronize());

  absl::StatusOr<std::unique_ptr<CudaCompressor>> compressor =
      CudaCompressor::Create(CudaCompressorOptions{});
  if (!compressor.ok()) {
    std::fprintf(stderr, "%s\n", compressor.status().ToString().c_str());
    return 1;
  }
  cudaStream_t stream;
  BENCH_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  std::vector<Row> rows;
  const size_t row_bytes = static_cast<size_t>(geometry.head_dim) * DTypeSize(geometry.dtype);
  for (const int64_t tokens : options.tokens) {
    for (const std::string& method : options.methods) {
      const MethodSpec spec = SpecFor(method, options.keep);
      const bool attention = spec.scorer == ScorerKind::kSnapKv;
      std::vector<DeviceLayerJob> jobs(options.layers);
      for (int l = 0; l < options.layers; ++l) {
        DeviceLayerJob& job = jobs[l];
        job.layer = l;
        job.input.keys = keys[l];
        job.input.values = values[l];
        job.input.queries = attention ? queries[l] : nullptr;
        job.input.shape.num_tokens = tokens;
        job.input.shape.num_window_queries = attention ? options.window : 0;
        job.tokens_per_head = LayerTokens(spec, tokens, options.window, l, options.layers);
      }
      std::vector<std::vector<DeviceLayerJob>> single_layers;
      for (const DeviceLayerJob& job : jobs) single_layers.push_back({job});
      Row row;
      row.tokens = tokens;
      row.method = method;
      row.layer =
          TimeCompress(**compressor, geometry, spec, single_layers, stream, options.repeats * 3);
      row.model = TimeCompress(**compressor, geometry, spec, {jobs}, stream, options.repeats);
      // Per layer: kept K and V rows read and written, K read once (not by streaming), the
      // window queries.
      row.floor_bytes_model = 0;
      for (const DeviceLayerJob& job : jobs) {
        const double kept_rows = static_cast<double>(geometry.num_kv_heads) * job.tokens_per_head;
        double bytes = 4.0 * kept_rows * row_bytes;
        if (spec.scorer != ScorerKind::kStreaming) bytes += geometry.KeyValueBytes(tokens);
        if (attention) bytes += query_bytes;
        row.floor_bytes_model += bytes;
      }
      row.floor_ms_model = row.floor_bytes_model / bandwidth * 1e3;
      rows.push_back(row);
      std::fprintf(stderr, "T=%lld %s: layer %.4f ms, model %.3f ms (floor %.3f ms)\n",
                   static_cast<long long>(tokens), method.c_str(), row.layer.total_ms,
                   row.model.total_ms, row.floor_ms_model);
    }
  }

  std::printf(
      "\n| T | method | per layer (ms) | whole model (ms) | floor, model (ms) | ratio to floor "
      "| floor bytes / time (GB/s) | attention+scores / select / gather (ms, model) |\n");
  std::printf("|---:|---|---:|---:|---:|---:|---:|---|\n");
  for (const Row& row : rows) {
    std::printf("| %lldK | %s | %.4f | %.3f | %.3f | %.2f× | %.0f | %.3f / %.3f / %.3f |\n",
                static_cast<long long>(row.tokens / 1024), row.method.c_str(), row.layer.total_ms,
                row.model.total_ms, row.floor_ms_model, row.model.total_ms / row.floor_ms_model,
                row.floor_bytes_model / (row.model.total_ms * 1e-3) / 1e9, row.model.score_ms,
                row.model.select_ms, row.model.gather_ms);
  }
  for (const Row& row : rows) {
    if (row.method == "snapkv" && row.tokens == 32768) {
      const double per_layer = row.model.total_ms / options.layers;
      std::printf(
          "\nSnapKV at 32K: %.4f ms per layer in a whole-model call (%.4f ms for one layer "
          "alone); kvpress 2.29 ms per layer on an H100 → %.0f× (%.0f× one layer alone)\n",
          per_layer, row.layer.total_ms, 2.29 / per_layer, 2.29 / row.layer.total_ms);
    }
  }
  for (int l = 0; l < options.layers; ++l) {
    BENCH_CHECK(cudaFree(keys[l]));
    BENCH_CHECK(cudaFree(values[l]));
    BENCH_CHECK(cudaFree(queries[l]));
  }
  BENCH_CHECK(cudaStreamDestroy(stream));
  return 0;
}

}  // namespace
}  // namespace kvcompress::bench

int main(int argc, char** argv) { return kvcompress::bench::Main(argc, argv); }
