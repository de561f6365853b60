#include "kernels/dtype.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "gtest/gtest.h"

namespace kvcompress {
namespace {

// fp16 → double by the IEEE 754 binary16 definition, independent of the implementation.
double Float16Value(uint16_t bits) {
  const int sign = (bits >> 15) ? -1 : 1;
  const int exponent = (bits >> 10) & 0x1f;
  const int mantissa = bits & 0x3ff;
  if (exponent == 0x1f) {
    return mantissa == 0 ? sign * std::numeric_limits<double>::infinity()
                         : std::numeric_limits<double>::quiet_NaN();
  }
  if (exponent == 0) return sign * std::ldexp(mantissa, -24);
  return sign * std::ldexp(1024 + mantissa, exponent - 25);
}

// bf16 → double: the top 16 bits of an fp32.
double BFloat16Value(uint16_t bits) {
  const int sign = (bits >> 15) ? -1 : 1;
  const int exponent = (bits >> 7) & 0xff;
  const int mantissa = bits & 0x7f;
  if (exponent == 0xff) {
    return mantissa == 0 ? sign * std::numeric_limits<double>::infinity()
                         : std::numeric_limits<double>::quiet_NaN();
  }
  if (exponent == 0) return sign * std::ldexp(mantissa, -133);
  return sign * std::ldexp(128 + mantissa, exponent - 134);
}

bool IsFloat16NaN(uint16_t bits) { return (bits & 0x7c00u) == 0x7c00u && (bits & 0x3ffu) != 0; }
bool IsBFloat16NaN(uint16_t bits) { return (bits & 0x7f80u) == 0x7f80u && (bits & 0x7fu) != 0; }

TEST(DTypeTest, NamesAndSizes) {
  EXPECT_EQ(DTypeName(DType::kFloat16), "float16");
  EXPECT_EQ(DTypeName(DType::kBFloat16), "bfloat16");
  EXPECT_EQ(DTypeName(DType::kFloat32), "float32");
  EXPECT_EQ(LayoutName(Layout::kHND), "HND");
  EXPECT_EQ(LayoutName(Layout::kNHD), "NHD");
  EXPECT_EQ(DTypeSize(DType::kFloat16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBFloat16), 2u);
  EXPECT_EQ(DTypeSize(DType::kFloat32), 4u);
}

TEST(DTypeTest, Float16ExhaustiveDecodeAndRoundTrip) {
  for (uint32_t bits = 0; bits <= 0xffffu; ++bits) {
    const uint16_t half = static_cast<uint16_t>(bits);
    const float value = Float16ToFloat(half);
    const double expected = Float16Value(half);
    if (IsFloat16NaN(half)) {
      EXPECT_TRUE(std::isnan(value)) << std::hex << bits;
      EXPECT_TRUE(IsFloat16NaN(FloatToFloat16(value))) << std::hex << bits;
      continue;
    }
    ASSERT_EQ(static_cast<double>(value), expected) << std::hex << bits;
    ASSERT_EQ(std::signbit(value), (bits & 0x8000u) != 0) << std::hex << bits;
    ASSERT_EQ(FloatToFloat16(value), half) << std::hex << bits;
  }
}

TEST(DTypeTest, BFloat16ExhaustiveDecodeAndRoundTrip) {
  for (uint32_t bits = 0; bits <= 0xffffu; ++bits) {
    const uint16_t half = static_cast<uint16_t>(bits);
    const float value = BFloat16ToFloat(half);
    if (IsBFloat16NaN(half)) {
      EXPECT_TRUE(std::isnan(value)) << std::hex << bits;
      EXPECT_TRUE(IsBFloat16NaN(FloatToBFloat16(value))) << std::hex << bits;
      continue;
    }
    ASSERT_EQ(static_cast<double>(value), BFloat16Value(half)) << std::hex << bits;
    ASSERT_EQ(std::signbit(value), (bits & 0x8000u) != 0) << std::hex << bits;
    ASSERT_EQ(FloatToBFloat16(value), half) << std::hex << bits;
  }
}

TEST(DTypeTest, Float16RoundsToNearestEven) {
  EXPECT_EQ(FloatToFloat16(1.0f), 0x3c00u);
  EXPECT_EQ(FloatToFloat16(-2.0f), 0xc000u);
  EXPECT_EQ(FloatToFloat16(65504.0f), 0x7bffu);  // largest finite
  EXPECT_EQ(FloatToFloat16(65519.99f), 0x7bffu);
  EXPECT_EQ(FloatToFloat16(65520.0f), 0x7c00u);  // halfway to 65536: ties to even → inf
  EXPECT_EQ(FloatToFloat16(1e10f), 0x7c00u);
  EXPECT_EQ(FloatToFloat16(-std::numeric_limits<float>::infinity()), 0xfc00u);
  // 1 + 2^-11 is halfway between 1 (even) and 1 + 2^-10: down. 1 + 3·2^-11: up to 1 + 2^-9.
  EXPECT_EQ(FloatToFloat16(1.0f + std::ldexp(1.0f, -11)), 0x3c00u);
  EXPECT_EQ(FloatToFloat16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02u);
  EXPECT_EQ(FloatToFloat16(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)), 0x3c01u);
  // Subnormals: 2^-24 is the smallest; 2^-25 ties to 0 (even); just above rounds up.
  EXPECT_EQ(FloatToFloat16(std::ldexp(1.0f, -24)), 0x0001u);
  EXPECT_EQ(FloatToFloat16(std::ldexp(1.0f, -25)), 0x0000u);
  EXPECT_EQ(FloatToFloat16(std::ldexp(1.5f, -25)), 0x0001u);
  EXPECT_EQ(FloatToFloat16(-std::ldexp(1.0f, -26)), 0x8000u);
  EXPECT_EQ(FloatToFloat16(3 * std::ldexp(1.0f, -25)), 0x0002u);  // 1.5 ulp: tie → even 2
  EXPECT_EQ(FloatToFloat16(std::ldexp(1023.5f, -24)), 0x0400u);   // rounds into the normals
  EXPECT_EQ(FloatToFloat16(0.1f), 0x2e66u);
}

TEST(DTypeTest, BFloat16RoundsToNearestEven) {
  EXPECT_EQ(FloatToBFloat16(1.0f), 0x3f80u);
  EXPECT_EQ(FloatToBFloat16(FloatFromBits(0x3f808000u)), 0x3f80u);  // tie, even stays
  EXPECT_EQ(FloatToBFloat16(FloatFromBits(0x3f818000u)), 0x3f82u);  // tie, odd rounds up
  EXPECT_EQ(FloatToBFloat16(FloatFromBits(0x3f808001u)), 0x3f81u);
  EXPECT_EQ(FloatToBFloat16(FloatFromBits(0x7f7fffffu)), 0x7f80u);  // max float → inf
  EXPECT_EQ(FloatToBFloat16(0.1f), 0x3dcdu);
  EXPECT_EQ(FloatToBFloat16(-3.0f), 0xc040u);
}

// Against a brute-force nearest search over neighbouring encodings.
TEST(DTypeTest, RandomFloatsRoundToTheNearestEncoding) {
  std::mt19937 generator(1234);
  std::uniform_int_distribution<uint32_t> bits_distribution;
  int checked = 0;
  for (int trial = 0; trial < 200000; ++trial) {
    const float value = FloatFromBits(bits_distribution(generator));
    if (!std::isfinite(value) || std::abs(value) > 60000.0f) continue;
    ++checked;
    const uint16_t half = FloatToFloat16(value);
    const double error = std::abs(Float16Value(half) - value);
    for (int delta : {-1, 1}) {
      const uint16_t neighbour = static_cast<uint16_t>(half + delta);
      if (IsFloat16NaN(neighbour) || std::isinf(Float16Value(neighbour))) continue;
      if ((neighbour ^ half) & 0x8000u) continue;  // crossed the sign
      const double neighbour_error = std::abs(Float16Value(neighbour) - value);
      ASSERT_LE(error, neighbour_error) << value;
      if (error == neighbour_error) {
        ASSERT_EQ(half & 1u, 0u) << "tie not to even: " << value;
      }
    }
    const uint16_t brain = FloatToBFloat16(value);
    const double brain_error = std::abs(BFloat16Value(brain) - value);
    for (int delta : {-1, 1}) {
      const uint16_t neighbour = static_cast<uint16_t>(brain + delta);
      if ((neighbour ^ brain) & 0x8000u) continue;
      const double neighbour_error = std::abs(BFloat16Value(neighbour) - value);
      ASSERT_LE(brain_error, neighbour_error) << value;
    }
  }
  EXPECT_GT(checked, 50000);
}

TEST(DTypeTest, LoadAsFloatReadsEachDType) {
  const float fp32[2] = {1.5f, -0.25f};
  const uint16_t fp16[2] = {0x3c00u, 0xc400u};  // 1, -4
  const uint16_t bf16[2] = {0x4040u, 0xbf80u};  // 3, -1
  EXPECT_EQ(LoadAsFloat(reinterpret_cast<const std::byte*>(fp32), DType::kFloat32, 1), -0.25f);
  EXPECT_EQ(LoadAsFloat(reinterpret_cast<const std::byte*>(fp16), DType::kFloat16, 1), -4.0f);
  EXPECT_EQ(LoadAsFloat(reinterpret_cast<const std::byte*>(bf16), DType::kBFloat16, 0), 3.0f);
  EXPECT_EQ(LoadAsFloat(reinterpret_cast<const std::byte*>(bf16), DType::kBFloat16, 1), -1.0f);
}

}  // namespace
}  // namespace kvcompress
