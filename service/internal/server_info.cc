#include "service/internal/server_info.h"

#include <unistd.h>

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/method_spec.h"
#include "service/stream_assembler.h"

namespace kvcompress {
namespace {

struct Parameter {
  std::string name;
  std::string type;
  std::string default_value;
  std::string description;
};

std::string Number(double value) { return absl::StrCat(value); }

// Head dim the per-backend probes use: one every backend runs.
constexpr int kProbeHeadDim = 128;

void AddMethod(v1::ServerInfo& info, std::span<const Backend* const> backends,
               const std::string& name, const std::string& stage, const MethodSpec& probe,
               const std::string& description, const std::vector<Parameter>& parameters) {
  v1::MethodInfo* method = info.add_methods();
  method->set_name(name);
  method->set_stage(stage);
  method->set_implemented(CheckMethodImplemented(probe).ok());
  for (const Backend* backend : backends) {
    if (backend->Supports(probe, kProbeHeadDim).ok()) {
      method->add_backends(std::string(backend->name()));
    }
  }
  method->set_description(description);
  for (const Parameter& parameter : parameters) {
    v1::MethodParameter* out = method->add_parameters();
    out->set_name(parameter.name);
    out->set_type(parameter.type);
    out->set_default_value(parameter.default_value);
    out->set_description(parameter.description);
  }
}

uint64_t PhysicalMemoryBytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page_size = sysconf(_SC_PAGESIZE);
  return pages > 0 && page_size > 0 ? static_cast<uint64_t>(pages) * page_size : 0;
}

}  // namespace

v1::ServerInfo BuildServerInfo(const std::string& version, std::span<const Backend* const> backends,
                               const ServerLimits& limits, int worker_threads) {
  v1::ServerInfo info;
  info.set_version(version);
  if (!backends.empty()) info.set_backend(std::string(backends.front()->name()));
  for (const Backend* backend : backends) info.add_backends(std::string(backend->name()));
  const MethodSpec defaults;

  // Each probe is the default method with one stage replaced, so `implemented` says whether
  // that stage runs in this build.
  auto with_scorer = [&](ScorerKind kind) {
    MethodSpec spec = defaults;
    spec.scorer = kind;
    return spec;
  };
  auto with_layer_budget = [&](LayerBudgetKind kind) {
    MethodSpec spec = defaults;
    spec.layer_budget = kind;
    return spec;
  };
  auto with_head_budget = [&](HeadBudgetKind kind) {
    MethodSpec spec = defaults;
    spec.head_budget = kind;
    return spec;
  };
  auto with_reducer = [&](ReducerKind kind) {
    MethodSpec spec = defaults;
    spec.reducer = kind;
    return spec;
  };
  const std::string group_reduction_default(GroupReductionName(defaults.snapkv.group_reduction));

  AddMethod(info, backends, "snapkv", "scorer", with_scorer(ScorerKind::kSnapKv),
            "SnapKV: attention of the last W window queries, pooled over the prefix; window "
            "tokens always kept. Needs num_window_queries > 0.",
            {{"window_size", "uint32", Number(defaults.snapkv.window_size),
              "observation window; at most the window queries sent"},
             {"kernel_size", "uint32", Number(defaults.snapkv.kernel_size), "pooling kernel, odd"},
             {"pooling", "enum", std::string(PoolingName(defaults.snapkv.pooling)), "avg or max"},
             {"group_reduction", "enum", group_reduction_default,
              "reduction over the query heads of a KV group: mean, max or sum"}});
  AddMethod(info, backends, "knorm", "scorer", with_scorer(ScorerKind::kKnorm),
            "Key L2 norm (Devoto et al.): score = -||k||; no queries needed.", {});
  AddMethod(info, backends, "streaming", "scorer", with_scorer(ScorerKind::kStreaming),
            "StreamingLLM: attention sinks plus the most recent tokens.",
            {{"sinks", "uint32", Number(defaults.streaming.sinks), "first tokens kept"}});
  AddMethod(
      info, backends, "observed", "scorer", with_scorer(ScorerKind::kObserved),
      "H2O-style: client-supplied scores [score_heads, T] fp32, group-reduced when per "
      "query head. Needs num_score_heads > 0.",
      {{"group_reduction", "enum",
        std::string(GroupReductionName(defaults.observed.group_reduction)), "mean, max or sum"}});
  AddMethod(info, backends, "tova", "scorer", with_scorer(ScorerKind::kTova),
            "TOVA: attention of the last query averaged over all heads; one selection shared "
            "by all heads.",
            {});
  AddMethod(info, backends, "keydiff", "scorer", with_scorer(ScorerKind::kKeyDiff),
            "KeyDiff: -cos(k_j, mean of normalised keys).", {});

  AddMethod(info, backends, "uniform", "layer_budget", with_layer_budget(LayerBudgetKind::kUniform),
            "Every layer keeps n tokens per head.", {});
  AddMethod(info, backends, "pyramid", "layer_budget", with_layer_budget(LayerBudgetKind::kPyramid),
            "PyramidKV: budgets decrease linearly with depth.",
            {{"beta", "double", Number(defaults.pyramid.beta), "min budget = (C - W) / beta"}});
  AddMethod(
      info, backends, "dynamic", "layer_budget", with_layer_budget(LayerBudgetKind::kDynamic),
      "DynamicKV: budgets follow each layer's share of the global top scores; results "
      "are final only at the last layer.",
      {{"r_max", "double", Number(defaults.dynamic.r_max), "temporary budget multiple per layer"},
       {"update_interval", "uint32", Number(defaults.dynamic.update_interval),
        "layers between global updates"}});

  AddMethod(info, backends, "uniform", "head_budget", with_head_budget(HeadBudgetKind::kUniform),
            "Every head keeps the layer budget.", {});
  AddMethod(
      info, backends, "adaptive", "head_budget", with_head_budget(HeadBudgetKind::kAdaptive),
      "AdaKV: heads share the layer budget by global top scores; ragged counts.",
      {{"alpha", "double", Number(defaults.adaptive.alpha), "fraction of n each head protects"}});

  AddMethod(info, backends, "drop", "reducer", with_reducer(ReducerKind::kDrop),
            "Evicted tokens are dropped.", {});
  const MergeSimilarOptions& merge = defaults.merge_similar;
  AddMethod(info, backends, "merge_similar", "reducer", with_reducer(ReducerKind::kMergeSimilar),
            "KVMerger reconstruction: contiguous runs of similar keys fold into their pivot "
            "with Gaussian weights.",
            {{"similarity_threshold", "double", Number(merge.similarity_threshold),
              "cosine similarity joining adjacent tokens"},
             {"sigma", "double", Number(merge.sigma), "Gaussian kernel width"},
             {"auto_sigma", "bool", merge.auto_sigma ? "true" : "false",
              "sigma from each set's RMS distance"},
             {"protect_fraction", "double", Number(merge.protect_fraction),
              "fraction of the budget kept verbatim by score"},
             {"scale_values_by_set_size", "bool", merge.scale_values_by_set_size ? "true" : "false",
              "scale merged values by the set size"}});
  AddMethod(info, backends, "merge_nearest", "reducer", with_reducer(ReducerKind::kMergeNearest),
            "Each evicted value folds into its most similar kept key's row (D2O/ToMe style).", {});

  info.add_dtypes(v1::DTYPE_FLOAT16);
  info.add_dtypes(v1::DTYPE_BFLOAT16);
  info.add_dtypes(v1::DTYPE_FLOAT32);
  info.add_layouts(v1::LAYOUT_HND);
  info.add_layouts(v1::LAYOUT_NHD);
  info.add_transports(v1::TRANSPORT_INLINE);

  for (const Backend* backend : backends) {
    const std::vector<BackendDevice> devices = backend->Devices();
    if (devices.empty()) {
      v1::DeviceInfo* host = info.add_devices();
      host->set_name("host");
      host->set_backend(std::string(backend->name()));
      host->set_memory_bytes(PhysicalMemoryBytes());
    }
    for (const BackendDevice& device : devices) {
      v1::DeviceInfo* out = info.add_devices();
      out->set_name(device.name);
      out->set_backend(std::string(backend->name()));
      out->set_ordinal(device.ordinal);
      out->set_compute_capability(device.compute_capability);
      out->set_memory_bytes(device.total_memory_bytes);
      out->set_memory_budget_bytes(device.budget_bytes);
      out->set_memory_in_use_bytes(device.in_use_bytes);
    }
  }

  v1::Limits* out = info.mutable_limits();
  out->set_max_request_bytes(limits.max_request_bytes);
  out->set_max_tokens(limits.max_tokens);
  out->set_max_layers(limits.max_layers);
  out->set_max_sequences(limits.max_sequences);
  out->set_max_concurrent_streams(limits.max_concurrent_streams);
  out->set_max_chunk_bytes(kMaxChunkDataBytes);
  info.set_worker_threads(static_cast<uint32_t>(worker_threads));
  return info;
}

}  // namespace kvcompress
