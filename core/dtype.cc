#include "core/dtype.h"

#include <cmath>

namespace mmdit {

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
  }
  return "?";
}

std::optional<DType> DTypeFromName(std::string_view name) {
  if (name == "F32") return DType::kF32;
  if (name == "F16") return DType::kF16;
  if (name == "BF16") return DType::kBF16;
  return std::nullopt;
}

float HalfToFloat(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1f;
  const uint32_t mantissa = bits & 0x3ff;
  uint32_t out;
  if (exponent == 0x1f) {
    out = sign | 0x7f800000 | (mantissa << 13);  // Inf or NaN
  } else if (exponent != 0) {
    out = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    out = sign;  // signed zero
  } else {
    // Subnormal half: value = mantissa * 2^-24, exact in float.
    const float value = std::ldexp(static_cast<float>(mantissa), -24);
    std::memcpy(&out, &value, 4);
    out |= sign;
  }
  float result;
  std::memcpy(&result, &out, 4);
  return result;
}

uint16_t FloatToHalf(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000);
  const uint32_t abs_bits = bits & 0x7fffffff;
  if (abs_bits > 0x7f800000) return sign | 0x7e00;   // NaN
  if (abs_bits >= 0x477ff000) return sign | 0x7c00;  // rounds to >= 65520: Inf
  if (abs_bits < 0x38800000) {                       // below 2^-14: subnormal or zero
    float abs_value;
    std::memcpy(&abs_value, &abs_bits, 4);
    return sign | static_cast<uint16_t>(std::nearbyint(abs_value * 16777216.0f));  // * 2^24
  }
  uint32_t rounded = abs_bits + 0xfff + ((abs_bits >> 13) & 1);  // nearest even on 13 dropped bits
  return sign | static_cast<uint16_t>((rounded - 0x38000000) >> 13);
}

void ConvertToFloat(DType dtype, const void* src, int64_t count, float* dst) {
  if (count == 0) return;  // empty tensors may come with null pointers, which memcpy may not take
  const auto* bytes = static_cast<const uint8_t*>(src);
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, count * 4);
      return;
    case DType::kF16:
      for (int64_t i = 0; i < count; ++i) dst[i] = HalfToFloat(bytes[2 * i] | (bytes[2 * i + 1] << 8));
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < count; ++i) dst[i] = BFloat16ToFloat(bytes[2 * i] | (bytes[2 * i + 1] << 8));
      return;
  }
}

void ConvertFromFloat(DType dtype, const float* src, int64_t count, void* dst) {
  if (count == 0) return;  // empty tensors may come with null pointers, which memcpy may not take
  auto* bytes = static_cast<uint8_t*>(dst);
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, count * 4);
      return;
    case DType::kF16:
    case DType::kBF16:
      for (int64_t i = 0; i < count; ++i) {
        const uint16_t bits = dtype == DType::kF16 ? FloatToHalf(src[i]) : FloatToBFloat16(src[i]);
        bytes[2 * i] = bits & 0xff;
        bytes[2 * i + 1] = bits >> 8;
      }
      return;
  }
}

}  // namespace mmdit
