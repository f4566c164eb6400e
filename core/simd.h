// What our own vector kernels (layers.cc, panel_gemm.cc) share: vector types of one register
// for each instruction set, their helpers, and the CPU's instruction set, for run-time
// dispatch. Internal to core/.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <utility>

namespace mmdit::simd {

// W floats: one zmm (W = 16, AVX-512), ymm (8, AVX2) or xmm (4, baseline x86-64). A kernel
// that runs on every instruction set takes its vector type as a template parameter and is
// instantiated at each one's native width: GCC 12 lowers a vector wider than the target's
// registers through the stack (a 16-float vector under AVX2 made attention 25x slower than
// under AVX-512, and LayerNorm 2x slower than scalar code). Loads and stores go through
// FloatUnaligned: scratch and activation rows are only float-aligned, and packed bf16 weights
// are loaded as float bits.
// A vector never crosses a call between functions of different targets (every helper is
// always_inline into one dispatch variant), so GCC's ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
template <int W>
struct VectorTypes {
  typedef float Float __attribute__((vector_size(4 * W)));
  typedef float FloatUnaligned __attribute__((vector_size(4 * W), aligned(4), may_alias));
  typedef int32_t Int __attribute__((vector_size(4 * W)));
};
template <int W>
using VecOf = typename VectorTypes<W>::Float;
template <typename V>
constexpr int kLanes = sizeof(V) / sizeof(float);

constexpr int64_t kVector = 16;  // floats per Vec
using Vec = VecOf<kVector>;      // AVX-512's: for kernels that only run there (PanelGemm)

template <typename V = Vec>
[[gnu::always_inline]] inline V Load(const float* p) {
  return *reinterpret_cast<const typename VectorTypes<kLanes<V>>::FloatUnaligned*>(p);
}
template <typename V>
[[gnu::always_inline]] inline void Store(float* p, V v) {
  *reinterpret_cast<typename VectorTypes<kLanes<V>>::FloatUnaligned*>(p) = v;
}
// A shuffle of lane 0, its indices written out: GCC emits one broadcast (folded into an FMA's
// memory operand under AVX-512) at every width. `V{} + x` would add 0 first (0 + -0 is +0, so
// that add cannot always be folded), GCC 12 builds `V{x, x, ...}` lane by lane, and indices
// from a parameter pack make it insert lane by lane too.
template <typename V = Vec>
[[gnu::always_inline]] inline V Broadcast(float x) {
  const V lane0 = {x};
  if constexpr (kLanes<V> == 16) {
    return __builtin_shufflevector(lane0, lane0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  } else if constexpr (kLanes<V> == 8) {
    return __builtin_shufflevector(lane0, lane0, 0, 0, 0, 0, 0, 0, 0, 0);
  } else {
    static_assert(kLanes<V> == 4);
    return __builtin_shufflevector(lane0, lane0, 0, 0, 0, 0);
  }
}

// Every lane = the maximum / the sum of v's lanes: a butterfly of lane swaps at distance
// W/2, ..., 2, 1, so the result needs no scalar extraction and no lane-by-lane chain.
template <int kDistance, typename V, int... kLane>
[[gnu::always_inline]] inline V SwapLanes(V v, std::integer_sequence<int, kLane...>) {
  return __builtin_shufflevector(v, v, (kLane ^ kDistance)...);
}
template <typename V, typename Op>
[[gnu::always_inline]] inline V Butterfly(V v, Op op) {
  constexpr auto lanes = std::make_integer_sequence<int, kLanes<V>>{};
  if constexpr (kLanes<V> >= 16) v = op(v, SwapLanes<8>(v, lanes));
  if constexpr (kLanes<V> >= 8) v = op(v, SwapLanes<4>(v, lanes));
  v = op(v, SwapLanes<2>(v, lanes));
  return op(v, SwapLanes<1>(v, lanes));
}
template <typename V>
[[gnu::always_inline]] inline V Max(V a, V b) {
  return a > b ? a : b;
}
template <typename V>
[[gnu::always_inline]] inline V AllLanesMax(V v) {
  return Butterfly(v, [](V a, V b) { return Max(a, b); });
}
template <typename V>
[[gnu::always_inline]] inline V AllLanesSum(V v) {
  return Butterfly(v, [](V a, V b) { return a + b; });
}

// At AVX-512's width (only ever inlined into AVX-512 code), Exp below rounds n with
// vrndscaleps and applies 2^n with vscalefps: 12 instructions instead of 17, and softmax runs
// it on every score. Written as asm because the templates that inline it carry no target
// attribute, which the intrinsics would need.
[[gnu::always_inline]] inline VecOf<16> RoundToNearestInteger(VecOf<16> x) {
  VecOf<16> rounded;
  asm("vrndscaleps $8, %1, %0" : "=v"(rounded) : "v"(x));  // 8: to nearest, no precision exception
  return rounded;
}
[[gnu::always_inline]] inline VecOf<16> TimesTwoToThe(VecOf<16> x, VecOf<16> n) {
  VecOf<16> scaled;
  asm("vscalefps %2, %1, %0" : "=v"(scaled) : "v"(x), "v"(n));  // x * 2^floor(n)
  return scaled;
}

// e^x for x up to 88 (softmax arguments after the row maximum is subtracted; GELU's), below
// 2 ulp: x = n ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor polynomial, times 2^n
// (built in the exponent bits, or by vscalefps at AVX-512's width). Arguments under -87 give
// e^-87 (~1e-38, still a normal float): a zero softmax weight at float32 precision.
template <typename V>
[[gnu::always_inline]] inline V Exp(V x) {
  using IntV = typename VectorTypes<kLanes<V>>::Int;
  x = x < -87.0f ? Broadcast<V>(-87.0f) : x;
  V n;       // x / ln2 rounded to an integer
  IntV n_i;  // the same, as integers (below AVX-512 only)
  if constexpr (kLanes<V> == 16) {
    n = RoundToNearestInteger(x * 1.44269504088896341f);
  } else {
    const V t = x * 1.44269504088896341f + 0.5f;
    n_i = __builtin_convertvector(t, IntV);                              // truncates toward zero
    n_i += reinterpret_cast<IntV>(t < __builtin_convertvector(n_i, V));  // -1 where that rounded up: floor
    n = __builtin_convertvector(n_i, V);
  }
  const V r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  V p = r * (1.0f / 720) + (1.0f / 120);
  p = p * r + (1.0f / 24);
  p = p * r + (1.0f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  if constexpr (kLanes<V> == 16) {
    return TimesTwoToThe(p, n);
  } else {
    return p * reinterpret_cast<V>((n_i + 127) << 23);  // 2^n in the exponent bits
  }
}

// The instruction set a kernel variant is built for; binaries are built for any x86-64 (no
// -march=native) and pick a variant at run time. Plain function pointers rather than GCC's
// target_clones: an ifunc resolver runs before the sanitizers' runtimes are up and crashes
// TSan builds.
enum class Isa { kAvx512, kAvx2, kBaseline };
#define MMDIT_TARGET_AVX512 gnu::target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#define MMDIT_TARGET_AVX2 gnu::target("avx2,fma")

// This CPU's, detected once. MMDIT_MAX_ISA=avx2 or =baseline caps it (never raises it), so
// that the tests can run every variant on one machine (tests/CMakeLists.txt) and a user can
// rule our AVX-512 kernels out.
inline Isa CpuIsa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    Isa detected = Isa::kBaseline;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      detected = Isa::kAvx512;
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      detected = Isa::kAvx2;
    }
    const char* cap = std::getenv("MMDIT_MAX_ISA");
    const std::string_view limit = cap == nullptr ? "" : cap;
    if (limit == "baseline") return Isa::kBaseline;
    if (limit == "avx2" && detected == Isa::kAvx512) return Isa::kAvx2;
    return detected;
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
