#include "kernels/cache_geometry.h"

#include "absl/strings/str_cat.h"

namespace kvcompress {
namespace {

constexpr int kMaxHeadDim = 1024;
constexpr int kMaxLayers = 4096;

}  // namespace

absl::Status ValidateGeometry(const CacheGeometry& geometry) {
  if (geometry.num_layers < 1 || geometry.num_layers > kMaxLayers) {
    return absl::InvalidArgumentError(
        absl::StrCat("geometry.num_layers: ", geometry.num_layers,
                     " is out of range; expected 1 <= num_layers <= ", kMaxLayers));
  }
  if (geometry.num_kv_heads < 1) {
    return absl::InvalidArgumentError(absl::StrCat("geometry.num_kv_heads: ", geometry.num_kv_heads,
                                                   " is out of range; expected >= 1"));
  }
  if (geometry.num_query_heads < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "geometry.num_query_heads: ", geometry.num_query_heads, " is out of range; expected >= 1"));
  }
  if (geometry.num_query_heads % geometry.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("geometry.num_query_heads: ", geometry.num_query_heads,
                     " is not a multiple of num_kv_heads ", geometry.num_kv_heads));
  }
  if (geometry.head_dim < 1 || geometry.head_dim > kMaxHeadDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("geometry.head_dim: ", geometry.head_dim,
                     " is out of range; expected 1 <= head_dim <= ", kMaxHeadDim));
  }
  if (geometry.dtype != DType::kFloat16 && geometry.dtype != DType::kBFloat16 &&
      geometry.dtype != DType::kFloat32) {
    return absl::InvalidArgumentError(
        absl::StrCat("geometry.dtype: ", static_cast<int>(geometry.dtype),
                     " is not a known dtype; expected float16, bfloat16 or float32"));
  }
  if (geometry.layout != Layout::kHND && geometry.layout != Layout::kNHD) {
    return absl::InvalidArgumentError(
        absl::StrCat("geometry.layout: ", static_cast<int>(geometry.layout),
                     " is not a known layout; expected HND or NHD"));
  }
  return absl::OkStatus();
}

}  // namespace kvcompress
