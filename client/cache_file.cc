#include "client/cache_file.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "kernels/status_macros.h"
#include "nlohmann/json.hpp"

namespace kvcompress {
namespace {

using Json = nlohmann::json;

TensorDType FileDType(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
      return TensorDType::kF16;
    case DType::kBFloat16:
      return TensorDType::kBF16;
    case DType::kFloat32:
      return TensorDType::kF32;
  }
  return TensorDType::kF32;
}

std::optional<DType> CacheDType(TensorDType dtype) {
  switch (dtype) {
    case TensorDType::kF16:
      return DType::kFloat16;
    case TensorDType::kBF16:
      return DType::kBFloat16;
    case TensorDType::kF32:
      return DType::kFloat32;
    default:
      return std::nullopt;
  }
}

// The names kernels/dtype.h documents for DTypeName, kept here so that this library needs
// no kernels code at link time.
absl::string_view MetadataDTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat32:
      return "float32";
  }
  return "?";
}

std::optional<DType> DTypeFromMetadataName(absl::string_view name) {
  for (DType dtype : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
    if (MetadataDTypeName(dtype) == name) return dtype;
  }
  return std::nullopt;
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::Status TensorError(absl::string_view path, absl::string_view tensor, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": tensor \"", tensor, "\": ", what));
}

// Parses "layers.{l}.{kind}"; false for any other name.
bool ParseLayerTensorName(absl::string_view name, int* layer, absl::string_view* kind) {
  std::vector<absl::string_view> parts = absl::StrSplit(name, '.');
  if (parts.size() != 3 || parts[0] != "layers" || parts[1].empty()) return false;
  if (parts[1].size() > 1 && parts[1][0] == '0') return false;
  if (!absl::SimpleAtoi(parts[1], layer) || *layer < 0) return false;
  *kind = parts[2];
  return true;
}

absl::StatusOr<int64_t> MetadataInt(const std::map<std::string, std::string>& metadata,
                                    absl::string_view path, const std::string& key) {
  auto it = metadata.find(key);
  if (it == metadata.end()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": __metadata__ lacks \"", key, "\""));
  }
  int64_t value = 0;
  if (!absl::SimpleAtoi(it->second, &value) || value < 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": __metadata__ \"", key, "\" = \"",
                                                   it->second,
                                                   "\", expected a non-negative integer"));
  }
  return value;
}

template <typename T>
std::vector<T> CopyTyped(std::span<const std::byte> bytes) {
  std::vector<T> out(bytes.size() / sizeof(T));
  if (!bytes.empty()) std::memcpy(out.data(), bytes.data(), out.size() * sizeof(T));
  return out;
}

std::vector<std::byte> CopyBytes(std::span<const std::byte> bytes) {
  return std::vector<std::byte>(bytes.begin(), bytes.end());
}

}  // namespace

std::string LayerTensorName(int layer, absl::string_view tensor) {
  return absl::StrCat("layers.", layer, ".", tensor);
}

absl::StatusOr<std::unique_ptr<CacheFileView>> CacheFileView::Open(const std::string& path) {
  auto view = std::unique_ptr<CacheFileView>(new CacheFileView());
  KVC_ASSIGN_OR_RETURN(view->reader_, SafetensorsReader::Open(path));
  const SafetensorsReader& reader = *view->reader_;
  const auto& metadata = reader.metadata();
  if (auto it = metadata.find("format"); it != metadata.end() && it->second != kCacheFileFormat) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": __metadata__ format is \"", it->second,
                                                   "\", expected \"", kCacheFileFormat,
                                                   "\" (an input cache)"));
  }

  // Group the tensors by layer.
  struct LayerEntries {
    const TensorEntry* keys = nullptr;
    const TensorEntry* values = nullptr;
    const TensorEntry* queries = nullptr;
    const TensorEntry* scores = nullptr;
  };
  std::vector<LayerEntries> entries;
  for (const TensorEntry& entry : reader.tensors()) {
    int layer = 0;
    absl::string_view kind;
    if (!ParseLayerTensorName(entry.name, &layer, &kind)) continue;
    if (layer >= 1 << 20) return TensorError(path, entry.name, "layer index too large");
    if (static_cast<size_t>(layer) >= entries.size()) entries.resize(layer + 1);
    if (kind == "keys") {
      entries[layer].keys = &entry;
    } else if (kind == "values") {
      entries[layer].values = &entry;
    } else if (kind == "queries") {
      entries[layer].queries = &entry;
    } else if (kind == "scores") {
      entries[layer].scores = &entry;
    } else {
      return TensorError(path, entry.name,
                         "unknown tensor kind; expected keys, values, queries or scores");
    }
  }
  if (entries.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": no layers.{l}.keys tensors; not a kvcompress cache file"));
  }

  // Layer 0 fixes the geometry; every layer must agree.
  const TensorEntry* keys0 = entries[0].keys;
  if (keys0 == nullptr) {
    return TensorError(path, LayerTensorName(0, "keys"), "missing");
  }
  std::optional<DType> dtype = CacheDType(keys0->dtype);
  if (!dtype) {
    return TensorError(
        path, keys0->name,
        absl::StrCat("dtype ", TensorDTypeName(keys0->dtype), ", expected F16, BF16 or F32"));
  }
  if (keys0->shape.size() != 3 || keys0->shape[0] <= 0 || keys0->shape[1] <= 0 ||
      keys0->shape[2] <= 0 || keys0->shape[0] > INT32_MAX || keys0->shape[2] > INT32_MAX) {
    return TensorError(path, keys0->name,
                       absl::StrCat("shape ", ShapeText(keys0->shape),
                                    ", expected [num_kv_heads, num_tokens, head_dim] > 0"));
  }
  const int64_t num_kv_heads = keys0->shape[0];
  const int64_t num_tokens = keys0->shape[1];
  const int64_t head_dim = keys0->shape[2];
  const std::vector<int64_t> kv_shape = keys0->shape;

  const bool has_queries = entries[0].queries != nullptr;
  const bool has_scores = entries[0].scores != nullptr;
  std::vector<int64_t> query_shape;
  std::vector<int64_t> score_shape;
  int64_t num_query_heads = num_kv_heads;
  if (has_queries) {
    const TensorEntry& q = *entries[0].queries;
    if (q.shape.size() != 3 || q.shape[0] <= 0 || q.shape[0] > INT32_MAX ||
        q.shape[0] % num_kv_heads != 0 || q.shape[1] <= 0 || q.shape[1] > INT32_MAX ||
        q.shape[2] != head_dim) {
      return TensorError(
          path, q.name,
          absl::StrCat("shape ", ShapeText(q.shape), ", expected [num_query_heads, window, ",
                       head_dim, "] with num_query_heads a multiple of ", num_kv_heads));
    }
    query_shape = q.shape;
    num_query_heads = q.shape[0];
  } else if (metadata.count("num_query_heads")) {
    KVC_ASSIGN_OR_RETURN(num_query_heads, MetadataInt(metadata, path, "num_query_heads"));
    if (num_query_heads <= 0 || num_query_heads > INT32_MAX ||
        num_query_heads % num_kv_heads != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": __metadata__ num_query_heads = ", num_query_heads,
                       ", expected a positive multiple of num_kv_heads ", num_kv_heads));
    }
  }
  if (has_scores) {
    const TensorEntry& s = *entries[0].scores;
    if (s.shape.size() != 2 || (s.shape[0] != num_kv_heads && s.shape[0] != num_query_heads) ||
        s.shape[1] != num_tokens) {
      return TensorError(path, s.name,
                         absl::StrCat("shape ", ShapeText(s.shape), ", expected [", num_kv_heads,
                                      " or ", num_query_heads, ", ", num_tokens, "]"));
    }
    score_shape = s.shape;
  }

  view->layers_.resize(entries.size());
  for (size_t l = 0; l < entries.size(); ++l) {
    const int layer = static_cast<int>(l);
    const LayerEntries& e = entries[l];
    auto check = [&](const TensorEntry* entry, absl::string_view kind, bool wanted,
                     TensorDType want_dtype,
                     const std::vector<int64_t>& want_shape) -> absl::Status {
      const std::string name = LayerTensorName(layer, kind);
      if (!wanted) {
        if (entry != nullptr) {
          return TensorError(path, name,
                             absl::StrCat("present, but layers.0.", kind,
                                          " is not; a file stores it in every layer or none"));
        }
        return absl::OkStatus();
      }
      if (entry == nullptr) {
        return TensorError(path, name,
                           l == 0
                               ? std::string("missing")
                               : absl::StrCat("missing (layers.0.", kind, " exists; layers run 0..",
                                              entries.size() - 1, ")"));
      }
      if (entry->dtype != want_dtype) {
        return TensorError(path, name,
                           absl::StrCat("dtype ", TensorDTypeName(entry->dtype), ", expected ",
                                        TensorDTypeName(want_dtype)));
      }
      if (entry->shape != want_shape) {
        return TensorError(
            path, name,
            absl::StrCat("shape ", ShapeText(entry->shape), ", expected ", ShapeText(want_shape)));
      }
      return absl::OkStatus();
    };
    KVC_RETURN_IF_ERROR(check(e.keys, "keys", true, keys0->dtype, kv_shape));
    KVC_RETURN_IF_ERROR(check(e.values, "values", true, keys0->dtype, kv_shape));
    KVC_RETURN_IF_ERROR(check(e.queries, "queries", has_queries, keys0->dtype, query_shape));
    KVC_RETURN_IF_ERROR(check(e.scores, "scores", has_scores, TensorDType::kF32, score_shape));
    LayerSpans& spans = view->layers_[l];
    spans.keys = reader.Data(*e.keys);
    spans.values = reader.Data(*e.values);
    if (e.queries) spans.queries = reader.Data(*e.queries);
    if (e.scores) spans.scores = reader.Data(*e.scores);
  }

  CacheGeometry& geometry = view->geometry_;
  geometry.num_layers = static_cast<int>(entries.size());
  geometry.num_kv_heads = static_cast<int>(num_kv_heads);
  geometry.num_query_heads = static_cast<int>(num_query_heads);
  geometry.head_dim = static_cast<int>(head_dim);
  geometry.dtype = *dtype;
  geometry.layout = Layout::kHND;
  view->shape_.num_tokens = num_tokens;
  view->shape_.num_window_queries = has_queries ? static_cast<int>(query_shape[1]) : 0;
  view->shape_.num_score_heads = has_scores ? static_cast<int>(score_shape[0]) : 0;
  return view;
}

size_t CacheFileView::LayerBytes(int layer) const {
  const LayerSpans& spans = layers_[layer];
  return spans.keys.size() + spans.values.size() + spans.queries.size() + spans.scores.size();
}

LayerInput CacheFileView::CopyLayer(int layer) const {
  const LayerSpans& spans = layers_[layer];
  LayerInput input;
  input.sequence = 0;
  input.layer = layer;
  input.shape = shape_;
  input.keys = CopyBytes(spans.keys);
  input.values = CopyBytes(spans.values);
  input.queries = CopyBytes(spans.queries);
  input.scores = CopyTyped<float>(spans.scores);
  return input;
}

absl::StatusOr<CacheFileInput> ReadCacheInput(const std::string& path) {
  KVC_ASSIGN_OR_RETURN(std::unique_ptr<CacheFileView> view, CacheFileView::Open(path));
  CacheFileInput input;
  input.geometry = view->geometry();
  input.shape = view->shape();
  input.metadata = view->metadata();
  input.layers.reserve(input.geometry.num_layers);
  for (int l = 0; l < input.geometry.num_layers; ++l) input.layers.push_back(view->CopyLayer(l));
  return input;
}

absl::Status WriteCacheInput(const std::string& path, const CacheGeometry& geometry,
                             const SequenceShape& shape, std::span<const LayerInput> layers,
                             const std::map<std::string, std::string>& metadata) {
  if (geometry.layout != Layout::kHND) {
    return absl::InvalidArgumentError(
        "WriteCacheInput: cache files store keys and values HND; got an NHD geometry");
  }
  if (geometry.num_layers <= 0 || static_cast<size_t>(geometry.num_layers) != layers.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "WriteCacheInput: geometry has ", geometry.num_layers, " layers, got ", layers.size()));
  }
  const TensorDType dtype = FileDType(geometry.dtype);
  const std::vector<int64_t> kv_shape = {geometry.num_kv_heads, shape.num_tokens,
                                         geometry.head_dim};
  const std::vector<int64_t> query_shape = {geometry.num_query_heads, shape.num_window_queries,
                                            geometry.head_dim};
  const std::vector<int64_t> score_shape = {shape.num_score_heads, shape.num_tokens};
  SafetensorsWriter writer;
  for (size_t l = 0; l < layers.size(); ++l) {
    const LayerInput& layer = layers[l];
    if (layer.layer != static_cast<int>(l)) {
      return absl::InvalidArgumentError(
          absl::StrCat("WriteCacheInput: layers[", l, "] holds layer ", layer.layer));
    }
    KVC_RETURN_IF_ERROR(
        writer.Add(LayerTensorName(layer.layer, "keys"), dtype, kv_shape, AsBytes(layer.keys)));
    KVC_RETURN_IF_ERROR(
        writer.Add(LayerTensorName(layer.layer, "values"), dtype, kv_shape, AsBytes(layer.values)));
    if (shape.num_window_queries > 0) {
      KVC_RETURN_IF_ERROR(writer.Add(LayerTensorName(layer.layer, "queries"), dtype, query_shape,
                                     AsBytes(layer.queries)));
    } else if (!layer.queries.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "WriteCacheInput: layer ", l, " has queries but the shape declares no window"));
    }
    if (shape.num_score_heads > 0) {
      KVC_RETURN_IF_ERROR(writer.Add(LayerTensorName(layer.layer, "scores"), TensorDType::kF32,
                                     score_shape, AsBytes(layer.scores)));
    } else if (!layer.scores.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "WriteCacheInput: layer ", l, " has scores but the shape declares no score heads"));
    }
  }
  for (const auto& [key, value] : metadata) writer.SetMetadata(key, value);
  writer.SetMetadata("format", std::string(kCacheFileFormat));
  writer.SetMetadata("num_query_heads", absl::StrCat(geometry.num_query_heads));
  return writer.Write(path);
}

CompressedLayerView ViewOf(const LayerResult& result) {
  CompressedLayerView view;
  view.layer = result.layer;
  view.padded = false;
  view.kept = result.kept;
  view.keys = AsBytes(result.keys);
  view.values = AsBytes(result.values);
  view.positions = result.positions;
  view.merged = result.merged;
  view.attention_mass_kept = result.attention_mass_kept;
  return view;
}

CompressedLayerView ViewOf(const PaddedLayerResult& result, int layer, double attention_mass_kept) {
  CompressedLayerView view;
  view.layer = layer;
  view.padded = true;
  view.max_kept = result.max_kept;
  view.kept = result.kept;
  view.keys = AsBytes(result.keys);
  view.values = AsBytes(result.values);
  view.positions = result.positions;
  view.merged = result.merged;
  view.attention_mass_kept = attention_mass_kept;
  return view;
}

absl::Status WriteCompressedCache(const std::string& path, const CacheGeometry& geometry,
                                  int64_t num_tokens, std::span<const CompressedLayerView> layers,
                                  const CompressedCacheInfo& info) {
  const int num_layers = geometry.num_layers;
  if (num_layers <= 0 || static_cast<size_t>(num_layers) != layers.size()) {
    return absl::InvalidArgumentError(absl::StrCat("WriteCompressedCache: geometry has ",
                                                   num_layers, " layers, got ", layers.size()));
  }
  std::vector<const CompressedLayerView*> by_layer(num_layers, nullptr);
  for (const CompressedLayerView& view : layers) {
    if (view.layer < 0 || view.layer >= num_layers || by_layer[view.layer] != nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("WriteCompressedCache: layer ", view.layer,
                                                     " is out of range or given twice"));
    }
    if (view.padded != layers[0].padded) {
      return absl::InvalidArgumentError(
          "WriteCompressedCache: layers mix ragged and padded results");
    }
    by_layer[view.layer] = &view;
  }

  const TensorDType dtype = FileDType(geometry.dtype);
  const size_t row_bytes = geometry.RowBytes();
  const int64_t heads = geometry.num_kv_heads;
  uint64_t tokens_kept = 0;
  Json attention_mass = Json::array();
  SafetensorsWriter writer;
  for (int l = 0; l < num_layers; ++l) {
    const CompressedLayerView& view = *by_layer[l];
    auto error = [&](absl::string_view what) {
      return absl::InvalidArgumentError(
          absl::StrCat("WriteCompressedCache: layer ", l, ": ", what));
    };
    if (static_cast<int64_t>(view.kept.size()) != heads) {
      return error(absl::StrCat("kept has ", view.kept.size(), " heads, expected ", heads));
    }
    int64_t total = 0;
    int32_t largest = 0;
    for (int32_t count : view.kept) {
      if (count < 0 || count > num_tokens) {
        return error(absl::StrCat("kept count ", count, " not in [0, ", num_tokens, "]"));
      }
      total += count;
      largest = std::max(largest, count);
    }
    tokens_kept += static_cast<uint64_t>(total);
    const int64_t rows = view.padded ? heads * view.max_kept : total;
    if (view.padded && view.max_kept < largest) {
      return error(absl::StrCat("max_kept ", view.max_kept, " < largest kept count ", largest));
    }
    if (view.keys.size() != rows * row_bytes || view.values.size() != rows * row_bytes) {
      return error(absl::StrCat("keys/values hold ", view.keys.size(), "/", view.values.size(),
                                " bytes, expected ", rows * row_bytes));
    }
    if (static_cast<int64_t>(view.positions.size()) != rows ||
        (!view.merged.empty() && static_cast<int64_t>(view.merged.size()) != rows)) {
      return error(absl::StrCat("positions/merged hold ", view.positions.size(), "/",
                                view.merged.size(), " entries, expected ", rows));
    }
    const std::vector<int64_t> kv_shape =
        view.padded ? std::vector<int64_t>{heads, view.max_kept, geometry.head_dim}
                    : std::vector<int64_t>{rows, geometry.head_dim};
    const std::vector<int64_t> index_shape =
        view.padded ? std::vector<int64_t>{heads, view.max_kept} : std::vector<int64_t>{rows};
    KVC_RETURN_IF_ERROR(writer.Add(LayerTensorName(l, "keys"), dtype, kv_shape, view.keys));
    KVC_RETURN_IF_ERROR(writer.Add(LayerTensorName(l, "values"), dtype, kv_shape, view.values));
    KVC_RETURN_IF_ERROR(writer.Add(LayerTensorName(l, "positions"), TensorDType::kI32, index_shape,
                                   AsBytes(view.positions)));
    KVC_RETURN_IF_ERROR(
        writer.Add(LayerTensorName(l, "kept"), TensorDType::kI32, {heads}, AsBytes(view.kept)));
    if (!view.merged.empty()) {
      KVC_RETURN_IF_ERROR(writer.Add(LayerTensorName(l, "merged"), TensorDType::kI32, index_shape,
                                     AsBytes(view.merged)));
    }
    attention_mass.push_back(view.attention_mass_kept);
  }

  for (const auto& [key, value] : info.extra) writer.SetMetadata(key, value);
  writer.SetMetadata("format", std::string(kCompressedFileFormat));
  writer.SetMetadata("method", info.method);
  writer.SetMetadata("parameters", info.parameters_json);
  writer.SetMetadata("output_format", layers[0].padded ? "padded" : "ragged");
  writer.SetMetadata("num_layers", absl::StrCat(num_layers));
  writer.SetMetadata("num_kv_heads", absl::StrCat(geometry.num_kv_heads));
  writer.SetMetadata("num_query_heads", absl::StrCat(geometry.num_query_heads));
  writer.SetMetadata("head_dim", absl::StrCat(geometry.head_dim));
  writer.SetMetadata("dtype", std::string(MetadataDTypeName(geometry.dtype)));
  writer.SetMetadata("num_tokens", absl::StrCat(num_tokens));
  writer.SetMetadata("tokens_in",
                     absl::StrCat(static_cast<uint64_t>(num_layers) * static_cast<uint64_t>(heads) *
                                  static_cast<uint64_t>(num_tokens)));
  writer.SetMetadata("tokens_kept", absl::StrCat(tokens_kept));
  writer.SetMetadata("attention_mass_kept", attention_mass.dump());
  return writer.Write(path);
}

absl::StatusOr<CompressedCacheFile> ReadCompressedCache(const std::string& path) {
  KVC_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsReader> reader, SafetensorsReader::Open(path));
  const auto& metadata = reader->metadata();
  auto format = metadata.find("format");
  if (format == metadata.end() || format->second != kCompressedFileFormat) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": __metadata__ format is \"",
                                                   format == metadata.end() ? "" : format->second,
                                                   "\", expected \"", kCompressedFileFormat, "\""));
  }
  CompressedCacheFile file;
  file.metadata = metadata;
  KVC_ASSIGN_OR_RETURN(const int64_t num_layers, MetadataInt(metadata, path, "num_layers"));
  KVC_ASSIGN_OR_RETURN(const int64_t heads, MetadataInt(metadata, path, "num_kv_heads"));
  KVC_ASSIGN_OR_RETURN(const int64_t query_heads, MetadataInt(metadata, path, "num_query_heads"));
  KVC_ASSIGN_OR_RETURN(const int64_t head_dim, MetadataInt(metadata, path, "head_dim"));
  KVC_ASSIGN_OR_RETURN(file.num_tokens, MetadataInt(metadata, path, "num_tokens"));
  if (num_layers <= 0 || num_layers > (1 << 20) || heads <= 0 || heads > INT32_MAX ||
      query_heads <= 0 || query_heads > INT32_MAX || head_dim <= 0 || head_dim > INT32_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": __metadata__ geometry out of range (num_layers ", num_layers,
                     ", num_kv_heads ", heads, ", head_dim ", head_dim, ")"));
  }
  auto dtype_it = metadata.find("dtype");
  std::optional<DType> dtype;
  if (dtype_it != metadata.end()) dtype = DTypeFromMetadataName(dtype_it->second);
  if (!dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": __metadata__ dtype missing or not float16, bfloat16, float32"));
  }
  auto output_format = metadata.find("output_format");
  file.padded = output_format != metadata.end() && output_format->second == "padded";
  Json attention_mass;
  if (auto it = metadata.find("attention_mass_kept"); it != metadata.end()) {
    attention_mass = Json::parse(it->second, nullptr, /*allow_exceptions=*/false);
  }
  if (!attention_mass.is_array() || attention_mass.size() != static_cast<size_t>(num_layers)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": __metadata__ attention_mass_kept must be a JSON array of ",
                     num_layers, " numbers"));
  }

  file.geometry.num_layers = static_cast<int>(num_layers);
  file.geometry.num_kv_heads = static_cast<int>(heads);
  file.geometry.num_query_heads = static_cast<int>(query_heads);
  file.geometry.head_dim = static_cast<int>(head_dim);
  file.geometry.dtype = *dtype;
  file.geometry.layout = Layout::kHND;
  const TensorDType file_dtype = FileDType(*dtype);
  const size_t row_bytes = static_cast<size_t>(head_dim) * DTypeSize(*dtype);

  for (int l = 0; l < num_layers; ++l) {
    auto get = [&](absl::string_view kind, TensorDType want,
                   bool required) -> absl::StatusOr<const TensorEntry*> {
      const std::string name = LayerTensorName(l, kind);
      const TensorEntry* entry = reader->Find(name);
      if (entry == nullptr) {
        if (required) return TensorError(path, name, "missing");
        return nullptr;
      }
      if (entry->dtype != want) {
        return TensorError(path, name,
                           absl::StrCat("dtype ", TensorDTypeName(entry->dtype), ", expected ",
                                        TensorDTypeName(want)));
      }
      return entry;
    };
    KVC_ASSIGN_OR_RETURN(const TensorEntry* kept_entry, get("kept", TensorDType::kI32, true));
    KVC_ASSIGN_OR_RETURN(const TensorEntry* keys_entry, get("keys", file_dtype, true));
    KVC_ASSIGN_OR_RETURN(const TensorEntry* values_entry, get("values", file_dtype, true));
    KVC_ASSIGN_OR_RETURN(const TensorEntry* positions_entry,
                         get("positions", TensorDType::kI32, true));
    KVC_ASSIGN_OR_RETURN(const TensorEntry* merged_entry, get("merged", TensorDType::kI32, false));
    if (kept_entry->shape != std::vector<int64_t>{heads}) {
      return TensorError(
          path, kept_entry->name,
          absl::StrCat("shape ", ShapeText(kept_entry->shape), ", expected [", heads, "]"));
    }
    LayerResult result;
    result.layer = l;
    result.kept = CopyTyped<int32_t>(reader->Data(*kept_entry));
    result.offsets.assign(1, 0);
    int64_t max_kept = 0;
    for (int32_t count : result.kept) {
      if (count < 0 || count > file.num_tokens) {
        return TensorError(path, kept_entry->name,
                           absl::StrCat("count ", count, " not in [0, ", file.num_tokens, "]"));
      }
      result.offsets.push_back(result.offsets.back() + count);
      max_kept = std::max<int64_t>(max_kept, count);
    }
    const int64_t total = result.offsets.back();
    if (file.padded && keys_entry->shape.size() == 3) {
      if (keys_entry->shape[1] < max_kept) {
        return TensorError(path, keys_entry->name,
                           absl::StrCat("padded to ", keys_entry->shape[1],
                                        " rows per head, but a head keeps ", max_kept));
      }
      max_kept = keys_entry->shape[1];
    }
    const std::vector<int64_t> kv_shape = file.padded
                                              ? std::vector<int64_t>{heads, max_kept, head_dim}
                                              : std::vector<int64_t>{total, head_dim};
    const std::vector<int64_t> index_shape =
        file.padded ? std::vector<int64_t>{heads, max_kept} : std::vector<int64_t>{total};
    for (const TensorEntry* entry : {keys_entry, values_entry}) {
      if (entry->shape != kv_shape) {
        return TensorError(
            path, entry->name,
            absl::StrCat("shape ", ShapeText(entry->shape), ", expected ", ShapeText(kv_shape)));
      }
    }
    for (const TensorEntry* entry : {positions_entry, merged_entry}) {
      if (entry != nullptr && entry->shape != index_shape) {
        return TensorError(
            path, entry->name,
            absl::StrCat("shape ", ShapeText(entry->shape), ", expected ", ShapeText(index_shape)));
      }
    }
    if (file.padded) {
      // Drop the padding rows of each head.
      const auto keys = reader->Data(*keys_entry);
      const auto values = reader->Data(*values_entry);
      const auto positions = reader->Data(*positions_entry);
      const auto merged_bytes =
          merged_entry ? reader->Data(*merged_entry) : std::span<const std::byte>();
      result.keys.resize(total * row_bytes);
      result.values.resize(total * row_bytes);
      result.positions.resize(total);
      if (merged_entry) result.merged.resize(total);
      for (int64_t h = 0; h < heads; ++h) {
        const size_t src_row = static_cast<size_t>(h * max_kept);
        const size_t dst_row = static_cast<size_t>(result.offsets[h]);
        const size_t count = static_cast<size_t>(result.kept[h]);
        if (count == 0) continue;
        std::memcpy(result.keys.data() + dst_row * row_bytes, keys.data() + src_row * row_bytes,
                    count * row_bytes);
        std::memcpy(result.values.data() + dst_row * row_bytes, values.data() + src_row * row_bytes,
                    count * row_bytes);
        std::memcpy(result.positions.data() + dst_row, positions.data() + src_row * 4, count * 4);
        if (merged_entry) {
          std::memcpy(result.merged.data() + dst_row, merged_bytes.data() + src_row * 4, count * 4);
        }
      }
    } else {
      result.keys = CopyBytes(reader->Data(*keys_entry));
      result.values = CopyBytes(reader->Data(*values_entry));
      result.positions = CopyTyped<int32_t>(reader->Data(*positions_entry));
      if (merged_entry) result.merged = CopyTyped<int32_t>(reader->Data(*merged_entry));
    }
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t i = result.offsets[h]; i < result.offsets[h + 1]; ++i) {
        const int32_t position = result.positions[i];
        if (position < 0 || position >= file.num_tokens ||
            (i > result.offsets[h] && position <= result.positions[i - 1])) {
          return TensorError(path, positions_entry->name,
                             absl::StrCat("head ", h, " row ", i - result.offsets[h], ": position ",
                                          position, " out of range or not ascending"));
        }
      }
    }
    const Json& mass = attention_mass[l];
    result.attention_mass_kept = mass.is_number() ? mass.get<double>() : -1.0;
    file.layers.push_back(std::move(result));
  }
  return file;
}

}  // namespace kvcompress
