// Element types and memory layouts of cached tensors, and the scalar conversions both
// backends share.
//
// Conversions are exact where the format allows: fp16/bf16 → fp32 is exact; fp32 → bf16 and
// fp32 → fp16 round to nearest even (NaN stays NaN). All functions are pure and thread-safe.
#ifndef KVCOMPRESS_KERNELS_DTYPE_H_
#define KVCOMPRESS_KERNELS_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "kernels/host_device.h"

namespace kvcompress {

enum class DType : uint8_t { kFloat16, kBFloat16, kFloat32 };

// Layout of K and V for one layer. Queries are always [H_q, W, D]; scores [H, T].
enum class Layout : uint8_t {
  kHND,  // [num_kv_heads, num_tokens, head_dim]
  kNHD,  // [num_tokens, num_kv_heads, head_dim]
};

KVC_HOST_DEVICE constexpr size_t DTypeSize(DType dtype) {
  return dtype == DType::kFloat32 ? 4 : 2;
}

std::string_view DTypeName(DType dtype);     // "float16", "bfloat16", "float32"
std::string_view LayoutName(Layout layout);  // "HND", "NHD"

KVC_HOST_DEVICE inline uint32_t FloatBits(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  return bits;
}

KVC_HOST_DEVICE inline float FloatFromBits(uint32_t bits) {
  float value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

KVC_HOST_DEVICE inline float BFloat16ToFloat(uint16_t bits) {
  return FloatFromBits(static_cast<uint32_t>(bits) << 16);
}

KVC_HOST_DEVICE inline uint16_t FloatToBFloat16(float value) {
  uint32_t bits = FloatBits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

KVC_HOST_DEVICE inline float Float16ToFloat(uint16_t half) {
  const uint32_t sign = static_cast<uint32_t>(half & 0x8000u) << 16;
  const uint32_t exponent = (half >> 10) & 0x1fu;
  uint32_t mantissa = half & 0x3ffu;
  if (exponent == 0x1fu) return FloatFromBits(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return FloatFromBits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return FloatFromBits(sign);
  // Subnormal half: normalise into a float.
  int shift = 0;
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    ++shift;
  }
  mantissa &= 0x3ffu;
  return FloatFromBits(sign | (static_cast<uint32_t>(113 - shift) << 23) | (mantissa << 13));
}

KVC_HOST_DEVICE inline uint16_t FloatToFloat16(float value) {
  const uint32_t bits = FloatBits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return sign | 0x7e00u;                  // NaN
  if (abs_bits >= 0x477ff000u) return sign | 0x7c00u;                 // overflow → inf
  if (abs_bits < 0x33000001u) return sign;                            // underflow → 0
  const int exponent = static_cast<int>(abs_bits >> 23) - 127;
  uint32_t mantissa = (abs_bits & 0x7fffffu) | 0x800000u;
  int shift = exponent < -14 ? (-14 - exponent) + 13 : 13;            // subnormal or normal
  uint32_t rounded = mantissa >> shift;
  const uint32_t remainder = mantissa & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1);
  if (remainder > halfway || (remainder == halfway && (rounded & 1u))) ++rounded;
  if (exponent < -14) return sign | static_cast<uint16_t>(rounded);
  return sign | static_cast<uint16_t>((static_cast<uint32_t>(exponent + 15) << 10) +
                                      (rounded - 0x400u));
}

// Reads element `index` of a tensor of `dtype` as fp32.
KVC_HOST_DEVICE inline float LoadAsFloat(const std::byte* base, DType dtype, size_t index) {
  if (dtype == DType::kFloat32) {
    float value;
    memcpy(&value, base + index * 4, 4);
    return value;
  }
  uint16_t bits;
  memcpy(&bits, base + index * 2, 2);
  return dtype == DType::kBFloat16 ? BFloat16ToFloat(bits) : Float16ToFloat(bits);
}

}  // namespace kvcompress

#endif  // KVCOMPRESS_KERNELS_DTYPE_H_
