// Element-wise work in kLanes lanes for the BLAS handlers (vit/blas_attention.cc,
// vit/blas_layer_norm.cc, vit/blas_gelu.cc): float32 and bfloat16 loads and stores, bfloat16
// rounding, exp and lane sums, written with GCC's vector extensions so
// that each function a handler compiles for several ISAs (VIT_CLONES) runs in that ISA's widest
// registers, with the same results on any.
#ifndef VIT_BLAS_LANES_H_
#define VIT_BLAS_LANES_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "blas_kernels.h"

namespace vit_blas {

constexpr int kLanes = 16;  // also the number of partial sums a row sum keeps, on any CPU

// kLanes floats, int32s or bfloat16 bits.
typedef float Floats __attribute__((vector_size(4 * kLanes)));
typedef int32_t Ints __attribute__((vector_size(4 * kLanes)));
typedef uint32_t Words __attribute__((vector_size(4 * kLanes)));
typedef uint16_t Halves __attribute__((vector_size(2 * kLanes)));

// The element-wise work is compiled for AVX-512, AVX2 and plain x86-64, and chosen at load time.
#define VIT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define VIT_INLINE __attribute__((always_inline)) inline

// n values of p as floats (all kLanes of them if n >= kLanes), the other lanes `fill`.
VIT_INLINE Floats Load(const float* p, int64_t n, float fill = 0.0f) {
  Floats v = Floats{} + fill;
  if (n >= kLanes) {
    std::memcpy(&v, p, sizeof v);
  } else {
    for (int64_t l = 0; l < n; ++l) {
      v[l] = p[l];
    }
  }
  return v;
}
VIT_INLINE Floats Load(const Bf16* p, int64_t n) {
  Halves bits = {};
  if (n >= kLanes) {
    std::memcpy(&bits, p, sizeof bits);
  } else {
    for (int64_t l = 0; l < n; ++l) {
      bits[l] = p[l];
    }
  }
  const Words words = __builtin_convertvector(bits, Words) << 16;
  return reinterpret_cast<const Floats&>(words);
}

// The first n (at most kLanes) lanes of v into p, rounded to p's type: to the nearest
// bfloat16, ties to even, as XLA converts (NaN stays NaN).
VIT_INLINE void Store(float* p, Floats v, int64_t n) {
  if (n >= kLanes) {
    std::memcpy(p, &v, sizeof v);
  } else {
    for (int64_t l = 0; l < n; ++l) {
      p[l] = v[l];
    }
  }
}
VIT_INLINE void Store(Bf16* p, Floats v, int64_t n) {
  const Words w = reinterpret_cast<const Words&>(v);
  Words rounded = (w + 0x7fffu + ((w >> 16) & 1u)) >> 16;
  rounded = (w & 0x7fffffffu) > 0x7f800000u ? (w >> 16) | 0x40u : rounded;  // NaN stays NaN
  const Halves bits = __builtin_convertvector(rounded, Halves);
  if (n >= kLanes) {
    std::memcpy(p, &bits, sizeof bits);
  } else {
    for (int64_t l = 0; l < n; ++l) {
      p[l] = bits[l];
    }
  }
}

// v as a T holds it: unchanged for float, rounded to bfloat16 (and widened back) for Bf16.
template <typename T>
VIT_INLINE Floats RoundTo(Floats v) {
  if constexpr (std::is_same_v<T, Bf16>) {
    Bf16 bits[kLanes];
    Store(bits, v, kLanes);
    return Load(bits, kLanes);
  } else {
    return v;
  }
}

// to[i] = f(from[i]) for i < n, computed in float32 kLanes at a time and stored as To; with a
// `bias`, f(from[i] + bias[i]), the sum rounded to From as XLA's add of two From arrays rounds.
template <typename To, typename From, typename F>
VIT_INLINE void Map(const From* from, int64_t n, To* to, F f, const From* bias = nullptr) {
  for (int64_t i = 0; i < n; i += kLanes) {
    const int64_t m = std::min<int64_t>(kLanes, n - i);
    Floats x = Load(from + i, m);
    if (bias != nullptr) {
      x = RoundTo<From>(x + Load(bias + i, m));
    }
    Store(to + i, f(x), m);
  }
}

// exp(x) in float32 within 2 ulp, lane by lane (Cephes' expf: 2^n times a degree-7 polynomial
// of the remainder); inputs clamped to where the result is a normal float, NaN kept.
VIT_INLINE Floats Exp(Floats x) {
  x = x < -87.3f ? Floats{} - 87.3f : x;
  x = x > 88.7f ? Floats{} + 88.7f : x;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds
  const Floats n = (x * 1.44269504088896341f + kRound) - kRound;
  const Floats r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  Floats p = Floats{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Floats y = p * r * r + r + 1.0f;
  const Ints bits = (__builtin_convertvector(n, Ints) + 127) << 23;
  return y * reinterpret_cast<const Floats&>(bits);
}

// The sum of v's lanes, added in lane order: the same on any CPU.
VIT_INLINE float Sum(Floats v) {
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) {
    sum += v[l];
  }
  return sum;
}

// Returns its argument: Map's function for a plain conversion.
const auto kSame = [](Floats x) { return x; };

}  // namespace vit_blas

#endif  // VIT_BLAS_LANES_H_
