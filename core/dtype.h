// Storage dtypes and their conversion to and from float32 (round to nearest even).
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace mmdit {

enum class DType { kF32, kF16, kBF16 };

inline size_t DTypeSize(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

// The safetensors spelling: "F32", "F16", "BF16".
const char* DTypeName(DType dtype);
std::optional<DType> DTypeFromName(std::string_view name);

float HalfToFloat(uint16_t bits);
uint16_t FloatToHalf(float value);

inline float BFloat16ToFloat(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, 4);
  return value;
}

inline uint16_t FloatToBFloat16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if ((bits & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

// Converts `count` little-endian elements of `dtype` at `src` to float32 at `dst`.
void ConvertToFloat(DType dtype, const void* src, int64_t count, float* dst);
// Converts `count` floats to `dtype`, written at `dst` (DTypeSize(dtype) * count bytes).
void ConvertFromFloat(DType dtype, const float* src, int64_t count, void* dst);

}  // namespace mmdit
