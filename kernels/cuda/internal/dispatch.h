// Runtime dtype and head_dim become compile-time constants here, at the launcher boundary.
// An unsupported value returns absl::UnimplementedError from the enclosing function.
//
//   KVC_DISPATCH_DTYPE(geometry.dtype, kDType, {
//     KVC_DISPATCH_HEAD_DIM(geometry.head_dim, kHeadDim, {
//       KVC_CUDA_RETURN_IF_ERROR((LaunchWindowStats<kDType, kHeadDim>(params, stream)));
//     });
//   });
#ifndef KVCOMPRESS_KERNELS_CUDA_INTERNAL_DISPATCH_H_
#define KVCOMPRESS_KERNELS_CUDA_INTERNAL_DISPATCH_H_

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/dtype.h"

#define KVC_DISPATCH_DTYPE(dtype, kDType, ...)                                          \
  switch (dtype) {                                                                      \
    case ::kvcompress::DType::kFloat16: {                                               \
      [[maybe_unused]] constexpr ::kvcompress::DType kDType = ::kvcompress::DType::kFloat16; \
      __VA_ARGS__;                                                                      \
      break;                                                                            \
    }                                                                                   \
    case ::kvcompress::DType::kBFloat16: {                                              \
      [[maybe_unused]] constexpr ::kvcompress::DType kDType = ::kvcompress::DType::kBFloat16; \
      __VA_ARGS__;                                                                      \
      break;                                                                            \
    }                                                                                   \
    case ::kvcompress::DType::kFloat32: {                                               \
      [[maybe_unused]] constexpr ::kvcompress::DType kDType = ::kvcompress::DType::kFloat32; \
      __VA_ARGS__;                                                                      \
      break;                                                                            \
    }                                                                                   \
    default:                                                                            \
      return ::absl::UnimplementedError(::absl::StrCat(                                 \
          "dtype ", static_cast<int>(dtype),                                            \
          " is not implemented by the cuda backend; expected float16, bfloat16 or float32")); \
  }

#define KVC_DISPATCH_HEAD_DIM(head_dim, kHeadDim, ...)                                  \
  switch (head_dim) {                                                                   \
    case 64: {                                                                          \
      [[maybe_unused]] constexpr int kHeadDim = 64;                                     \
      __VA_ARGS__;                                                                      \
      break;                                                                            \
    }                                                                                   \
    case 128: {                                                                         \
      [[maybe_unused]] constexpr int kHeadDim = 128;                                    \
      __VA_ARGS__;                                                                      \
      break;                                                                            \
    }                                                                                   \
    case 256: {                                                                         \
      [[maybe_unused]] constexpr int kHeadDim = 256;                                    \
      __VA_ARGS__;                                                                      \
      break;                                                                            \
    }                                                                                   \
    default:                                                                            \
      return ::absl::UnimplementedError(::absl::StrCat(                                 \
          "head_dim ", head_dim, " is not implemented by the cuda backend; expected 64, 128 or 256")); \
  }

#endif  // KVCOMPRESS_KERNELS_CUDA_INTERNAL_DISPATCH_H_
