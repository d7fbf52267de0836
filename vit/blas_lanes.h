// Element-wise work in kLanes lanes for the BLAS handlers (vit/blas_attention.cc,
// vit/blas_layer_norm.cc, vit/blas_gelu.cc): float32 and bfloat16 loads and stores, bfloat16
// rounding, exp and lane sums. vit/blas_gemm.py compiles the handlers for this CPU's widest
// vectors (`handler_isa`: AVX-512, AVX2 with FMA, or plain x86-64), and a value of kLanes lanes
// is held in as many of that ISA's vector registers as it takes: one on AVX-512, two on AVX2,
// four on SSE. (GCC keeps a vector wider than the ISA's registers in memory and compares it
// lane by lane: GELU ran 9x slower on AVX2 than on AVX-512 that way.) The lanes and the order
// of every sum are the same on any ISA; where the ISA has FMA, GCC fuses multiplies and adds.
#ifndef VIT_BLAS_LANES_H_
#define VIT_BLAS_LANES_H_

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "blas_kernels.h"

namespace vit_blas {

constexpr int kLanes = 16;  // also the number of partial sums a row sum keeps, on any CPU
#if defined(__AVX512F__)
constexpr int kParts = 1;
#elif defined(__AVX2__)
constexpr int kParts = 2;
#else
constexpr int kParts = 4;
#endif
constexpr int kPartLanes = kLanes / kParts;

#define VIT_INLINE __attribute__((always_inline)) inline

// kLanes values of E: kParts vectors of kPartLanes.
template <typename E>
struct Lanes {
  typedef E Part __attribute__((vector_size(sizeof(E) * kPartLanes)));
  typedef int32_t Mask __attribute__((vector_size(4 * kPartLanes)));
  typedef E Unaligned __attribute__((vector_size(sizeof(E) * kPartLanes), aligned(alignof(E)),
                                     may_alias));  // a Part anywhere in memory
  Part part[kParts];

  E operator[](int l) const { return part[l / kPartLanes][l % kPartLanes]; }
  void Set(int l, E v) { part[l / kPartLanes][l % kPartLanes] = v; }

  // The R (a Lanes) whose part i is f(i).
  template <typename R = Lanes, typename F>
  static VIT_INLINE R Each(F f) {
    R r;
    for (int i = 0; i < kParts; ++i) {
      r.part[i] = f(i);
    }
    return r;
  }

#define VIT_LANES_OP(op)                                                              \
  friend VIT_INLINE Lanes operator op(Lanes a, Lanes b) {                             \
    return Each([&](int i) { return a.part[i] op b.part[i]; });                       \
  }                                                                                   \
  friend VIT_INLINE Lanes operator op(Lanes a, E b) {                                 \
    return Each([&](int i) { return a.part[i] op b; });                               \
  }                                                                                   \
  friend VIT_INLINE Lanes operator op(E a, Lanes b) {                                 \
    return Each([&](int i) { return a op b.part[i]; });                               \
  }                                                                                   \
  VIT_INLINE Lanes& operator op##=(Lanes b) { return *this = *this op b; }
  VIT_LANES_OP(+)
  VIT_LANES_OP(-)
  VIT_LANES_OP(*)
  VIT_LANES_OP(/)
  VIT_LANES_OP(&)
  VIT_LANES_OP(|)
  VIT_LANES_OP(<<)
  VIT_LANES_OP(>>)
#undef VIT_LANES_OP
  friend VIT_INLINE Lanes operator~(Lanes a) { return Each([&](int i) { return ~a.part[i]; }); }
  // All ones in the lanes where the comparison holds, else zeros.
  friend VIT_INLINE Lanes<int32_t> operator<(Lanes a, Lanes b) {
    return Each<Lanes<int32_t>>([&](int i) { return (Mask)(a.part[i] < b.part[i]); });
  }
  friend VIT_INLINE Lanes<int32_t> operator<(Lanes a, E b) {
    return Each<Lanes<int32_t>>([&](int i) { return (Mask)(a.part[i] < b); });
  }
  friend VIT_INLINE Lanes<int32_t> operator>(Lanes a, Lanes b) { return b < a; }
  friend VIT_INLINE Lanes<int32_t> operator>(Lanes a, E b) {
    return Each<Lanes<int32_t>>([&](int i) { return (Mask)(a.part[i] > b); });
  }
};

// kLanes floats, int32s, uint32s or bfloat16 bits.
using Floats = Lanes<float>;
using Ints = Lanes<int32_t>;
using Words = Lanes<uint32_t>;
using Halves = Lanes<uint16_t>;

// kLanes values of E at p, and into p: each part one vector move.
template <typename E>
VIT_INLINE Lanes<E> LoadLanes(const E* p) {
  return Lanes<E>::Each([&](int i) {
    return *reinterpret_cast<const typename Lanes<E>::Unaligned*>(p + i * kPartLanes);
  });
}
template <typename E>
VIT_INLINE void StoreLanes(E* p, Lanes<E> v) {
  for (int i = 0; i < kParts; ++i) {
    *reinterpret_cast<typename Lanes<E>::Unaligned*>(p + i * kPartLanes) = v.part[i];
  }
}

// v's bits as lanes of To, of E's width.
template <typename To, typename E>
VIT_INLINE Lanes<To> BitCast(Lanes<E> v) {
  static_assert(sizeof(To) == sizeof(E));
  return Lanes<To>::Each([&](int i) { return (typename Lanes<To>::Part)v.part[i]; });
}

// Each lane of v converted to To.
template <typename To, typename E>
VIT_INLINE Lanes<To> Convert(Lanes<E> v) {
  return Lanes<To>::Each([&](int i) {
    return __builtin_convertvector(v.part[i], typename Lanes<To>::Part);
  });
}

// Lane by lane, a where `mask` is all ones, else b.
template <typename E>
VIT_INLINE Lanes<E> Select(Ints mask, Lanes<E> a, Lanes<E> b) {
  return BitCast<E>((BitCast<int32_t>(a) & mask) | (BitCast<int32_t>(b) & ~mask));
}

// n values of p as floats (all kLanes of them if n >= kLanes), the other lanes `fill`.
VIT_INLINE Floats Load(const float* p, int64_t n, float fill = 0.0f) {
  if (n >= kLanes) {
    return LoadLanes(p);
  }
  Floats v = Floats{} + fill;
  for (int64_t l = 0; l < n; ++l) {
    v.Set(l, p[l]);
  }
  return v;
}
VIT_INLINE Floats Load(const Bf16* p, int64_t n) {
  Halves bits = {};
  if (n >= kLanes) {
    bits = LoadLanes(p);
  } else {
    for (int64_t l = 0; l < n; ++l) {
      bits.Set(l, p[l]);
    }
  }
  return BitCast<float>(Convert<uint32_t>(bits) << 16u);
}

// The first n (at most kLanes) lanes of v into p, rounded to p's type: to the nearest
// bfloat16, ties to even, as XLA converts (NaN stays NaN).
VIT_INLINE void Store(float* p, Floats v, int64_t n) {
  if (n >= kLanes) {
    StoreLanes(p, v);
  } else {
    for (int64_t l = 0; l < n; ++l) {
      p[l] = v[l];
    }
  }
}
VIT_INLINE void Store(Bf16* p, Floats v, int64_t n) {
  const Words w = BitCast<uint32_t>(v);
  Words rounded = (w + 0x7fffu + ((w >> 16u) & 1u)) >> 16u;
  rounded = Select((w & 0x7fffffffu) > 0x7f800000u, (w >> 16u) | 0x40u, rounded);  // NaN: NaN
  const Halves bits = Convert<uint16_t>(rounded);
  if (n >= kLanes) {
    StoreLanes(p, bits);
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
  x = Select(x < -87.3f, Floats{} - 87.3f, x);
  x = Select(x > 88.7f, Floats{} + 88.7f, x);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer ...
  const Floats rounded = x * 1.44269504088896341f + kRound;
  const Floats n = rounded - kRound;
  const Floats r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  Floats p = Floats{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Floats y = p * r * r + r + 1.0f;
  // ... which its low bits hold: the exponent's bits without a float to int conversion
  const Ints bits = (BitCast<int32_t>(rounded) - BitCast<int32_t>(Floats{} + kRound) + 127) << 23;
  return y * BitCast<float>(bits);
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
