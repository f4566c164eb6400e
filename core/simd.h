// What our own vector kernels (layers.cc, panel_gemm.cc) share: a 16-float vector type that
// one kernel body compiles to for every instruction set, its helpers, and the CPU's
// instruction set, for run-time dispatch. Internal to core/.
#pragma once

#include <cstdint>

namespace mmdit::simd {

constexpr int64_t kVector = 16;  // floats per Vec

// Sixteen floats. GCC lowers it to one zmm register under AVX-512, two ymm under AVX2 and four
// xmm on baseline x86-64, so one kernel body serves every instruction set. Loads and stores go
// through VecUnaligned: scratch and activation rows are only float-aligned, and packed bf16
// weights are loaded as float bits.
// Vec never crosses a call between functions of different targets (every helper is
// always_inline into one dispatch variant), so GCC's ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float Vec __attribute__((vector_size(64)));
typedef float VecUnaligned __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t IntVec __attribute__((vector_size(64)));

[[gnu::always_inline]] inline Vec Load(const float* p) { return *reinterpret_cast<const VecUnaligned*>(p); }
[[gnu::always_inline]] inline void Store(float* p, Vec v) { *reinterpret_cast<VecUnaligned*>(p) = v; }
// A shuffle of lane 0: GCC emits one broadcast (folded into an FMA's memory operand under
// AVX-512). `Vec{} + x` would add 0 first (0 + -0 is +0, so that add cannot be folded), and
// GCC 12 builds `Vec{x, x, ...}` lane by lane.
[[gnu::always_inline]] inline Vec Broadcast(float x) {
  const Vec lane0 = {x};
  return __builtin_shufflevector(lane0, lane0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
}

// Every lane = the maximum / the sum of v's lanes: a butterfly of lane swaps at distance
// 8, 4, 2, 1, so the result needs no scalar extraction and no lane-by-lane chain.
[[gnu::always_inline]] inline Vec Max(Vec a, Vec b) { return a > b ? a : b; }
[[gnu::always_inline]] inline Vec AllLanesMax(Vec v) {
  v = Max(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = Max(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = Max(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  return Max(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
}
[[gnu::always_inline]] inline Vec AllLanesSum(Vec v) {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  return v + __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
}

// e^x for x <= 0 (softmax arguments after the row maximum is subtracted), below 2 ulp:
// x = n ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor polynomial, times 2^n built in
// the exponent bits. Arguments under -87 flush to e^-87 (~1e-38): a zero softmax weight at
// float32 precision.
[[gnu::always_inline]] inline Vec ExpNonPositive(Vec x) {
  x = x < -87.0f ? Broadcast(-87.0f) : x;
  const Vec t = x * 1.44269504088896341f + 0.5f;
  IntVec n = __builtin_convertvector(t, IntVec);                       // truncates toward zero
  n += reinterpret_cast<IntVec>(t < __builtin_convertvector(n, Vec));  // -1 where that rounded up: floor
  const Vec nf = __builtin_convertvector(n, Vec);
  const Vec r = x - nf * 0.693145751953125f - nf * 1.428606765330187e-06f;
  Vec p = r * (1.0f / 720) + (1.0f / 120);
  p = p * r + (1.0f / 24);
  p = p * r + (1.0f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * reinterpret_cast<Vec>((n + 127) << 23);
}

// The instruction set a kernel variant is built for; binaries are built for any x86-64 (no
// -march=native) and pick a variant at run time. Plain function pointers rather than GCC's
// target_clones: an ifunc resolver runs before the sanitizers' runtimes are up and crashes
// TSan builds.
enum class Isa { kAvx512, kAvx2, kBaseline };
#define MMDIT_TARGET_AVX512 gnu::target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#define MMDIT_TARGET_AVX2 gnu::target("avx2,fma")

// This CPU's, detected once.
inline Isa CpuIsa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return isa;
}

// Whether this CPU has AVX512_BF16 (`vdpbf16ps`), detected once.
inline bool CpuHasBf16DotProduct() {
  static const bool has = CpuIsa() == Isa::kAvx512 && __builtin_cpu_supports("avx512bf16");
  return has;
}

// acc += the dot products of x's and w's bf16 pairs, lane by lane (`vdpbf16ps`): each lane of
// x and w holds two bf16 values, read as a float's bits. Only for AVX-512 kernels, on CPUs
// with CpuHasBf16DotProduct(). Written as assembly so that the kernels need not be compiled
// for AVX512_BF16: with that target GCC may use its instructions anywhere in a function, and
// the float32 variants of the same kernels must run on AVX-512 CPUs without it.
[[gnu::always_inline]] inline Vec DotBf16Pairs(Vec acc, Vec x, Vec w) {
  asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
  return acc;
}

// Sixteen floats rounded to bf16 (to nearest even; `vcvtneps2bf16`), for the same kernels as
// DotBf16Pairs and written the same way. Unlike FloatToBFloat16 it flushes float32 denormals to
// zero, which bf16 products would lose anyway.
typedef uint16_t Bf16x16 __attribute__((vector_size(32)));
[[gnu::always_inline]] inline Bf16x16 RoundToBf16(Vec x) {
  Bf16x16 rounded;
  asm("vcvtneps2bf16 %1, %0" : "=v"(rounded) : "v"(x));
  return rounded;
}

}  // namespace mmdit::simd
