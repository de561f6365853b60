#include "client/method_flags.h"

#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"

namespace kvcompress {
namespace {

absl::Status FlagError(absl::string_view name, absl::string_view value,
                       absl::string_view expected) {
  return absl::InvalidArgumentError(absl::StrCat("--", name, "=", value, ": expected ", expected));
}

// "merge-similar" and "Merge_Similar" both name merge_similar.
std::string Normalize(absl::string_view word) {
  return absl::StrReplaceAll(absl::AsciiStrToLower(word), {{"-", "_"}});
}

constexpr uint32_t kMaxCount = 1u << 30;

struct MethodPreset {
  absl::string_view name;
  v1::Scorer::KindCase scorer;
  absl::string_view layer_budget;  // "" = uniform
  absl::string_view head_budget;
  absl::string_view reducer;
};

constexpr MethodPreset kMethods[] = {
    {"snapkv", v1::Scorer::kSnapkv, "", "", ""},
    {"knorm", v1::Scorer::kKnorm, "", "", ""},
    {"streaming", v1::Scorer::kStreaming, "", "", ""},
    {"observed", v1::Scorer::kObserved, "", "", ""},
    {"tova", v1::Scorer::kTova, "", "", ""},
    {"keydiff", v1::Scorer::kKeydiff, "", "", ""},
    {"pyramidkv", v1::Scorer::kSnapkv, "pyramid", "", ""},
    {"adakv", v1::Scorer::kSnapkv, "", "adaptive", ""},
    {"dynamickv", v1::Scorer::kSnapkv, "dynamic", "", ""},
    {"kvmerger", v1::Scorer::kSnapkv, "", "", "merge_similar"},
    {"h2o", v1::Scorer::kObserved, "", "", ""},
};

std::string MethodList() {
  std::vector<absl::string_view> names;
  for (const MethodPreset& preset : kMethods) names.push_back(preset.name);
  return absl::StrJoin(names, ", ");
}

absl::StatusOr<v1::Pooling> ParsePooling(absl::string_view value) {
  const std::string word = Normalize(value);
  if (word == "avg" || word == "mean") return v1::POOLING_AVG;
  if (word == "max") return v1::POOLING_MAX;
  return FlagError("pooling", value, "avg or max");
}

absl::StatusOr<v1::GroupReduction> ParseGroupReduction(absl::string_view value) {
  const std::string word = Normalize(value);
  if (word == "mean") return v1::GROUP_REDUCTION_MEAN;
  if (word == "max") return v1::GROUP_REDUCTION_MAX;
  if (word == "sum") return v1::GROUP_REDUCTION_SUM;
  return FlagError("group-reduction", value, "mean, max or sum");
}

// Fails when `flag` is given although `applies` is false.
absl::Status RequireStage(const ParsedFlags& flags, absl::string_view flag, bool applies,
                          absl::string_view stage) {
  if (!flags.Has(flag) || applies) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("--", flag, " applies to ", stage, " only"));
}

// proto3 cannot tell an explicit 0 from "unset", and the server reads unset as the default;
// so a 0 the user means would silently become the default. Refuse it instead.
absl::Status RejectZero(const ParsedFlags& flags, absl::string_view name,
                        const std::optional<double>& value, absl::string_view default_text) {
  if (!value || *value != 0.0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("--", name, "=", *flags.Get(name),
                   ": 0 cannot be expressed on the wire (proto3 reads 0 "
                   "as unset, i.e. the default ",
                   default_text, "); use a small positive value"));
}

#define KVC_FLAGS_RETURN_IF_ERROR(expr)                  \
  do {                                                   \
    ::absl::Status kvc_flags_status = (expr);            \
    if (!kvc_flags_status.ok()) return kvc_flags_status; \
  } while (false)

}  // namespace

std::optional<std::string> ParsedFlags::Get(absl::string_view name) const {
  auto it = values_.find(std::string(name));
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

absl::StatusOr<std::optional<uint32_t>> ParsedFlags::GetUint(absl::string_view name, uint32_t min,
                                                             uint32_t max) const {
  std::optional<std::string> text = Get(name);
  if (!text) return std::optional<uint32_t>();
  uint64_t value = 0;
  if (!absl::SimpleAtoi(*text, &value) || value < min || value > max) {
    return FlagError(name, *text, absl::StrCat("an integer in [", min, ", ", max, "]"));
  }
  return std::optional<uint32_t>(static_cast<uint32_t>(value));
}

absl::StatusOr<std::optional<double>> ParsedFlags::GetDouble(absl::string_view name, double min,
                                                             double max) const {
  std::optional<std::string> text = Get(name);
  if (!text) return std::optional<double>();
  double value = 0;
  if (!absl::SimpleAtod(*text, &value) || !(value >= min && value <= max)) {
    return FlagError(name, *text, absl::StrCat("a number in [", min, ", ", max, "]"));
  }
  return std::optional<double>(value);
}

absl::StatusOr<ParsedFlags> ParseFlags(std::span<const std::string> args,
                                       std::span<const FlagSpec> known, absl::string_view command) {
  ParsedFlags parsed;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg.size() < 3 || arg.compare(0, 2, "--") != 0) {
      return absl::InvalidArgumentError(absl::StrCat("kvc ", command, ": unexpected argument \"",
                                                     arg, "\"; flags look like --name=value"));
    }
    const size_t equals = arg.find('=');
    const std::string name =
        arg.substr(2, equals == std::string::npos ? std::string::npos : equals - 2);
    auto spec = std::find_if(known.begin(), known.end(),
                             [&](const FlagSpec& flag) { return flag.name == name; });
    if (spec == known.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("kvc ", command, ": unknown flag --", name, " (see kvc help)"));
    }
    std::string value;
    if (spec->takes_value) {
      if (equals != std::string::npos) {
        value = arg.substr(equals + 1);
      } else if (i + 1 < args.size() && args[i + 1].compare(0, 2, "--") != 0) {
        value = args[++i];
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("kvc ", command, ": flag --", name, " needs a value"));
      }
      if (value.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("kvc ", command, ": flag --", name, " has an empty value"));
      }
    } else if (equals != std::string::npos) {
      value = Normalize(arg.substr(equals + 1));
      if (value == "1") value = "true";
      if (value == "0") value = "false";
      if (value != "true" && value != "false") {
        return FlagError(name, arg.substr(equals + 1), "true or false");
      }
    } else {
      value = "true";
    }
    if (!parsed.values_.emplace(name, value).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("kvc ", command, ": flag --", name, " given twice"));
    }
  }
  return parsed;
}

std::span<const FlagSpec> MethodFlagSpecs() {
  static const std::vector<FlagSpec> specs = {
      {"method", true, "NAME  " + MethodList()},
      {"keep", true, "RATIO  tokens kept per head as a fraction of T, in (0, 1]"},
      {"keep-tokens", true, "N  tokens kept per head"},
      {"window", true, "N  snapkv observation window (default 64)"},
      {"kernel-size", true, "N  snapkv pooling kernel, odd (default 5)"},
      {"pooling", true, "avg|max  snapkv pooling (default avg)"},
      {"group-reduction", true, "mean|max|sum  GQA group reduction (default mean)"},
      {"sinks", true, "N  streaming: attention sinks kept (default 4)"},
      {"skip-layers", true, "L,L,...  layers returned whole"},
      {"protect-sinks", true, "N  first tokens always kept"},
      {"protect-recent", true, "N  most recent tokens always kept"},
      {"layer-budget", true, "uniform|pyramid|dynamic  (default uniform)"},
      {"beta", true, "X  pyramid: beta (default 20)"},
      {"r-max", true, "X  dynamic: r_max (default 10)"},
      {"update-interval", true, "N  dynamic: update interval m (default 4)"},
      {"head-budget", true, "uniform|adaptive  (default uniform)"},
      {"alpha", true, "X  adaptive: safeguard fraction (default 0.2)"},
      {"reducer", true, "drop|merge_similar|merge_nearest  (default drop)"},
      {"similarity-threshold", true, "X  merge_similar: epsilon (default 0.75)"},
      {"sigma", true, "X|auto  merge_similar: Gaussian sigma (default 5)"},
      {"protect-fraction", true, "X  merge_similar: budget fraction kept verbatim"},
      {"scale-values", false, "merge_similar: scale merged values by the set size"},
  };
  return specs;
}

absl::StatusOr<v1::MethodSpec> MethodSpecFromFlags(const ParsedFlags& flags) {
  v1::MethodSpec spec;
  const std::optional<std::string> method = flags.Get("method");
  if (!method) {
    return absl::InvalidArgumentError(absl::StrCat("--method is required; one of ", MethodList()));
  }
  const std::string method_name = Normalize(*method);
  const MethodPreset* preset = nullptr;
  for (const MethodPreset& candidate : kMethods) {
    if (candidate.name == method_name) preset = &candidate;
  }
  if (preset == nullptr) return FlagError("method", *method, absl::StrCat("one of ", MethodList()));

  // Budget: exactly one of --keep and --keep-tokens.
  if (flags.Has("keep") == flags.Has("keep-tokens")) {
    return absl::InvalidArgumentError(
        "give exactly one of --keep RATIO (in (0, 1]) and --keep-tokens N");
  }
  if (flags.Has("keep")) {
    double ratio = 0;
    const std::string text = *flags.Get("keep");
    if (!absl::SimpleAtod(text, &ratio) || !(ratio > 0.0 && ratio <= 1.0)) {
      return FlagError("keep", text, "a ratio in (0, 1]");
    }
    spec.set_keep_ratio(ratio);
  } else {
    absl::StatusOr<std::optional<uint32_t>> tokens = flags.GetUint("keep-tokens", 1, UINT32_MAX);
    if (!tokens.ok()) return tokens.status();
    spec.set_keep_tokens(**tokens);
  }

  // Scorer and its options.
  const bool snapkv = preset->scorer == v1::Scorer::kSnapkv;
  const bool observed = preset->scorer == v1::Scorer::kObserved;
  const bool streaming = preset->scorer == v1::Scorer::kStreaming;
  KVC_FLAGS_RETURN_IF_ERROR(RequireStage(flags, "window", snapkv, "snapkv-based methods"));
  KVC_FLAGS_RETURN_IF_ERROR(RequireStage(flags, "kernel-size", snapkv, "snapkv-based methods"));
  KVC_FLAGS_RETURN_IF_ERROR(RequireStage(flags, "pooling", snapkv, "snapkv-based methods"));
  KVC_FLAGS_RETURN_IF_ERROR(
      RequireStage(flags, "group-reduction", snapkv || observed, "snapkv and observed"));
  KVC_FLAGS_RETURN_IF_ERROR(RequireStage(flags, "sinks", streaming, "--method streaming"));
  std::optional<v1::GroupReduction> reduction;
  if (std::optional<std::string> text = flags.Get("group-reduction")) {
    absl::StatusOr<v1::GroupReduction> parsed = ParseGroupReduction(*text);
    if (!parsed.ok()) return parsed.status();
    reduction = *parsed;
  }
  v1::Scorer* scorer = spec.mutable_scorer();
  switch (preset->scorer) {
    case v1::Scorer::kSnapkv: {
      v1::SnapKvScorer* options = scorer->mutable_snapkv();
      absl::StatusOr<std::optional<uint32_t>> window = flags.GetUint("window", 1, kMaxCount);
      if (!window.ok()) return window.status();
      if (*window) options->set_window_size(**window);
      absl::StatusOr<std::optional<uint32_t>> kernel = flags.GetUint("kernel-size", 1, 1023);
      if (!kernel.ok()) return kernel.status();
      if (*kernel) {
        if (**kernel % 2 == 0) {
          return FlagError("kernel-size", *flags.Get("kernel-size"), "an odd number");
        }
        options->set_kernel_size(**kernel);
      }
      if (std::optional<std::string> text = flags.Get("pooling")) {
        absl::StatusOr<v1::Pooling> pooling = ParsePooling(*text);
        if (!pooling.ok()) return pooling.status();
        options->set_pooling(*pooling);
      }
      if (reduction) options->set_group_reduction(*reduction);
      break;
    }
    case v1::Scorer::kKnorm:
      scorer->mutable_knorm();
      break;
    case v1::Scorer::kStreaming: {
      v1::StreamingScorer* options = scorer->mutable_streaming();
      // 0 would read as "unset" on the wire, i.e. the default of 4.
      absl::StatusOr<std::optional<uint32_t>> sinks = flags.GetUint("sinks", 1, kMaxCount);
      if (!sinks.ok()) return sinks.status();
      if (*sinks) options->set_sinks(**sinks);
      break;
    }
    case v1::Scorer::kObserved: {
      v1::ObservedScorer* options = scorer->mutable_observed();
      if (reduction) options->set_group_reduction(*reduction);
      break;
    }
    case v1::Scorer::kTova:
      scorer->mutable_tova();
      break;
    case v1::Scorer::kKeydiff:
      scorer->mutable_keydiff();
      break;
    default:
      return absl::InternalError("unhandled scorer");
  }

  // Layer budget.
  const std::string layer_budget =
      Normalize(flags.Get("layer-budget").value_or(std::string(preset->layer_budget)));
  KVC_FLAGS_RETURN_IF_ERROR(
      RequireStage(flags, "beta", layer_budget == "pyramid", "--layer-budget pyramid"));
  KVC_FLAGS_RETURN_IF_ERROR(
      RequireStage(flags, "r-max", layer_budget == "dynamic", "--layer-budget dynamic"));
  KVC_FLAGS_RETURN_IF_ERROR(
      RequireStage(flags, "update-interval", layer_budget == "dynamic", "--layer-budget dynamic"));
  if (layer_budget.empty() || layer_budget == "uniform") {
    spec.mutable_layer_budget()->mutable_uniform();
  } else if (layer_budget == "pyramid") {
    v1::PyramidLayerBudget* pyramid = spec.mutable_layer_budget()->mutable_pyramid();
    absl::StatusOr<std::optional<double>> beta = flags.GetDouble("beta", 1e-9, 1e9);
    if (!beta.ok()) return beta.status();
    if (*beta) pyramid->set_beta(**beta);
  } else if (layer_budget == "dynamic") {
    v1::DynamicLayerBudget* dynamic = spec.mutable_layer_budget()->mutable_dynamic();
    absl::StatusOr<std::optional<double>> r_max = flags.GetDouble("r-max", 1e-9, 1e9);
    if (!r_max.ok()) return r_max.status();
    if (*r_max) dynamic->set_r_max(**r_max);
    absl::StatusOr<std::optional<uint32_t>> interval =
        flags.GetUint("update-interval", 1, kMaxCount);
    if (!interval.ok()) return interval.status();
    if (*interval) dynamic->set_update_interval(**interval);
  } else {
    return FlagError("layer-budget", *flags.Get("layer-budget"), "uniform, pyramid or dynamic");
  }

  // Head budget.
  const std::string head_budget =
      Normalize(flags.Get("head-budget").value_or(std::string(preset->head_budget)));
  KVC_FLAGS_RETURN_IF_ERROR(
      RequireStage(flags, "alpha", head_budget == "adaptive", "--head-budget adaptive"));
  if (head_budget.empty() || head_budget == "uniform") {
    spec.mutable_head_budget()->mutable_uniform();
  } else if (head_budget == "adaptive") {
    v1::AdaptiveHeadBudget* adaptive = spec.mutable_head_budget()->mutable_adaptive();
    absl::StatusOr<std::optional<double>> alpha = flags.GetDouble("alpha", 0.0, 1.0);
    if (!alpha.ok()) return alpha.status();
    KVC_FLAGS_RETURN_IF_ERROR(RejectZero(flags, "alpha", *alpha, "0.2"));
    if (*alpha) adaptive->set_alpha(**alpha);
  } else {
    return FlagError("head-budget", *flags.Get("head-budget"), "uniform or adaptive");
  }

  // Reducer.
  const std::string reducer =
      Normalize(flags.Get("reducer").value_or(std::string(preset->reducer)));
  const bool merge_similar = reducer == "merge_similar";
  for (absl::string_view flag :
       {"similarity-threshold", "sigma", "protect-fraction", "scale-values"}) {
    KVC_FLAGS_RETURN_IF_ERROR(RequireStage(flags, flag, merge_similar, "--reducer merge_similar"));
  }
  if (reducer.empty() || reducer == "drop") {
    spec.mutable_reducer()->mutable_drop();
  } else if (merge_similar) {
    v1::MergeSimilarReducer* merge = spec.mutable_reducer()->mutable_merge_similar();
    absl::StatusOr<std::optional<double>> threshold =
        flags.GetDouble("similarity-threshold", -1.0, 1.0);
    if (!threshold.ok()) return threshold.status();
    KVC_FLAGS_RETURN_IF_ERROR(RejectZero(flags, "similarity-threshold", *threshold, "0.75"));
    if (*threshold) merge->set_similarity_threshold(**threshold);
    if (std::optional<std::string> sigma = flags.Get("sigma")) {
      if (Normalize(*sigma) == "auto") {
        merge->set_auto_sigma(true);
      } else {
        absl::StatusOr<std::optional<double>> value = flags.GetDouble("sigma", 1e-9, 1e9);
        if (!value.ok()) return FlagError("sigma", *sigma, "a positive number or auto");
        merge->set_sigma(**value);
      }
    }
    absl::StatusOr<std::optional<double>> protect = flags.GetDouble("protect-fraction", 0, 1);
    if (!protect.ok()) return protect.status();
    KVC_FLAGS_RETURN_IF_ERROR(RejectZero(flags, "protect-fraction", *protect, "of the server"));
    if (*protect) merge->set_protect_fraction(**protect);
    merge->set_scale_values_by_set_size(flags.GetBool("scale-values"));
  } else if (reducer == "merge_nearest") {
    spec.mutable_reducer()->mutable_merge_nearest();
  } else {
    return FlagError("reducer", *flags.Get("reducer"), "drop, merge_similar or merge_nearest");
  }

  // Layers and tokens that stay.
  if (std::optional<std::string> text = flags.Get("skip-layers")) {
    for (absl::string_view part : absl::StrSplit(*text, ',')) {
      uint32_t layer = 0;
      if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &layer)) {
        return FlagError("skip-layers", *text, "a comma-separated list of layer indices");
      }
      spec.add_skip_layers(layer);
    }
  }
  absl::StatusOr<std::optional<uint32_t>> protect_sinks =
      flags.GetUint("protect-sinks", 0, kMaxCount);
  if (!protect_sinks.ok()) return protect_sinks.status();
  if (*protect_sinks) spec.set_protect_sinks(**protect_sinks);
  absl::StatusOr<std::optional<uint32_t>> protect_recent =
      flags.GetUint("protect-recent", 0, kMaxCount);
  if (!protect_recent.ok()) return protect_recent.status();
  if (*protect_recent) spec.set_protect_recent(**protect_recent);
  return spec;
}

std::string MethodSpecToJson(const v1::MethodSpec& spec) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  std::string json;
  if (!google::protobuf::util::MessageToJsonString(spec, &json, options).ok()) return "{}";
  return json;
}

std::string MethodName(const v1::MethodSpec& spec) {
  std::string name;
  switch (spec.scorer().kind_case()) {
    case v1::Scorer::kSnapkv:
      name = "snapkv";
      break;
    case v1::Scorer::kKnorm:
      name = "knorm";
      break;
    case v1::Scorer::kStreaming:
      name = "streaming";
      break;
    case v1::Scorer::kObserved:
      name = "observed";
      break;
    case v1::Scorer::kTova:
      name = "tova";
      break;
    case v1::Scorer::kKeydiff:
      name = "keydiff";
      break;
    default:
      name = "unset";
  }
  if (spec.layer_budget().has_pyramid()) absl::StrAppend(&name, "+pyramid");
  if (spec.layer_budget().has_dynamic()) absl::StrAppend(&name, "+dynamic");
  if (spec.head_budget().has_adaptive()) absl::StrAppend(&name, "+adaptive");
  if (spec.reducer().has_merge_similar()) absl::StrAppend(&name, "+merge_similar");
  if (spec.reducer().has_merge_nearest()) absl::StrAppend(&name, "+merge_nearest");
  return name;
}

}  // namespace kvcompress
