// KV cache files: one sequence per safetensors file (see client/safetensors.h).
//
// Input files ("kvcompress.cache.v1"), per layer l:
//   layers.{l}.keys, layers.{l}.values  [H_kv, T, D]  F16 | BF16 | F32 (always HND)
//   layers.{l}.queries                  [H_q, W, D]   same dtype (optional: last W post-RoPE
//                                                     queries; all layers or none)
//   layers.{l}.scores                   [H, T]        F32 (optional, H = H_kv or H_q)
//   __metadata__: format, num_query_heads (needed when no queries are stored), model info.
//
// Output files ("kvcompress.compressed.v1"), per layer l, ragged:
//   layers.{l}.keys, layers.{l}.values  [Σ kept, D]   input dtype, heads in order,
//                                                     positions ascending within a head
//   layers.{l}.positions                [Σ kept]      I32 original token index
//   layers.{l}.kept                     [H_kv]        I32
//   layers.{l}.merged                   [Σ kept]      I32 (merging reducers only)
// or padded (output_format = "padded"): keys/values [H_kv, max_kept, D], positions and
// merged [H_kv, max_kept] (positions −1 past a head's count).
//   __metadata__: format, method, parameters (the MethodSpec as JSON), tokens_in,
//   tokens_kept, num_tokens, num_layers, num_kv_heads, num_query_heads, head_dim, dtype,
//   output_format, attention_mass_kept (JSON array, one per layer), plus caller extras.
//
// All readers validate shapes and dtypes against each other and return INVALID_ARGUMENT
// naming the file and the tensor. Functions are thread-compatible.
#ifndef KVCOMPRESS_CLIENT_CACHE_FILE_H_
#define KVCOMPRESS_CLIENT_CACHE_FILE_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "client/safetensors.h"
#include "kernels/cache_geometry.h"
#include "kernels/layer_result.h"

namespace kvcompress {

inline constexpr absl::string_view kCacheFileFormat = "kvcompress.cache.v1";
inline constexpr absl::string_view kCompressedFileFormat = "kvcompress.compressed.v1";

// The tensor names of layer `layer`: "layers.{layer}.{tensor}".
std::string LayerTensorName(int layer, absl::string_view tensor);

// An input cache file mapped into memory; nothing is copied. Views stay valid while the
// object lives. Immutable after Open: safe to read from several threads.
class CacheFileView final {
 public:
  // Opens and validates `path` (layers numbered 0…L−1 without gaps, equal shapes in every
  // layer, queries in all layers or none, scores F32 [H_kv or H_q, T]).
  static absl::StatusOr<std::unique_ptr<CacheFileView>> Open(const std::string& path);

  CacheFileView(const CacheFileView&) = delete;
  CacheFileView& operator=(const CacheFileView&) = delete;

  const CacheGeometry& geometry() const { return geometry_; }  // layout is always HND
  const SequenceShape& shape() const { return shape_; }
  const std::map<std::string, std::string>& metadata() const { return reader_->metadata(); }
  const std::string& path() const { return reader_->path(); }

  // Tensor bytes of layer `layer` (empty spans for absent queries or scores).
  std::span<const std::byte> keys(int layer) const { return layers_[layer].keys; }
  std::span<const std::byte> values(int layer) const { return layers_[layer].values; }
  std::span<const std::byte> queries(int layer) const { return layers_[layer].queries; }
  std::span<const std::byte> scores(int layer) const { return layers_[layer].scores; }
  // Total tensor bytes of one layer.
  size_t LayerBytes(int layer) const;

  // An owned copy of one layer (sequence index 0), what CompressionPipeline::AddLayer takes.
  LayerInput CopyLayer(int layer) const;

 private:
  struct LayerSpans {
    std::span<const std::byte> keys, values, queries, scores;
  };
  CacheFileView() = default;

  std::unique_ptr<SafetensorsReader> reader_;
  CacheGeometry geometry_;
  SequenceShape shape_;
  std::vector<LayerSpans> layers_;
};

// An input cache file read into owned layers.
struct CacheFileInput {
  CacheGeometry geometry;
  SequenceShape shape;
  std::vector<LayerInput> layers;  // layers[l].layer == l, sequence 0
  std::map<std::string, std::string> metadata;
};

absl::StatusOr<CacheFileInput> ReadCacheInput(const std::string& path);

// Writes an input cache file. Requires HND geometry, layers[l] holding layer l with
// `shape`'s sizes (INVALID_ARGUMENT otherwise). `metadata` is stored as is, plus
// format and num_query_heads.
absl::Status WriteCacheInput(const std::string& path, const CacheGeometry& geometry,
                             const SequenceShape& shape, std::span<const LayerInput> layers,
                             const std::map<std::string, std::string>& metadata = {});

// One compressed layer, viewed. Ragged: keys/values [Σ kept, D], positions/merged [Σ kept].
// Padded: keys/values [H_kv, max_kept, D], positions/merged [H_kv, max_kept].
struct CompressedLayerView {
  int layer = 0;
  bool padded = false;
  int max_kept = 0;  // padded only
  std::span<const int32_t> kept;
  std::span<const std::byte> keys;
  std::span<const std::byte> values;
  std::span<const int32_t> positions;
  std::span<const int32_t> merged;  // empty when there are no merged counts
  double attention_mass_kept = -1.0;
};

CompressedLayerView ViewOf(const LayerResult& result);
CompressedLayerView ViewOf(const PaddedLayerResult& result, int layer, double attention_mass_kept);

// What the output file records about how it was made.
struct CompressedCacheInfo {
  std::string method;                        // e.g. "snapkv"
  std::string parameters_json;               // the MethodSpec as JSON text
  std::map<std::string, std::string> extra;  // anything else (backend, source file, model)
};

// Writes an output file for one sequence of `num_tokens` tokens. `layers` holds every
// layer once, in any order; all ragged or all padded. INVALID_ARGUMENT when sizes do not
// match the geometry.
absl::Status WriteCompressedCache(const std::string& path, const CacheGeometry& geometry,
                                  int64_t num_tokens, std::span<const CompressedLayerView> layers,
                                  const CompressedCacheInfo& info);

// An output file read back. Padded files are returned ragged (padding rows dropped).
struct CompressedCacheFile {
  CacheGeometry geometry;  // num_query_heads from the metadata
  int64_t num_tokens = 0;
  bool padded = false;
  std::vector<LayerResult> layers;  // layers[l].layer == l; attention mass from metadata
  std::map<std::string, std::string> metadata;
};

absl::StatusOr<CompressedCacheFile> ReadCompressedCache(const std::string& path);

}  // namespace kvcompress

#endif  // KVCOMPRESS_CLIENT_CACHE_FILE_H_
