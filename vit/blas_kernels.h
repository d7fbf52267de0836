// What the BLAS handlers share (vit/blas_gemm.cc's GEMMs, vit/blas_attention.cc's attention,
// vit/blas_layer_norm.cc's and vit/blas_gelu.cc's element-wise calls): the BLAS's GEMMs as handed
// over, the slabs on XLA's intra-op pool, the row-wise calls' shape checks, and the dispatch on
// dtype (with the GEMM for it).
#ifndef VIT_BLAS_KERNELS_H_
#define VIT_BLAS_KERNELS_H_

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace vit_blas {

namespace ffi = xla::ffi;

// A row-major GEMM on operands of T with float32 sums: cblas_sgemm's signature for T = float,
// cblas_gemm_bf16bf16f32's for T = uint16_t (bfloat16 bits).
template <typename T>
using GemmFn = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                        const T* a, int lda, const T* b, int ldb, float beta, float* c, int ldc);
using Bf16 = uint16_t;
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr double kSplitFlops = 4e6;  // smaller products run whole, on the calling thread
constexpr int64_t kSlabAlign = 16;   // row and column slab edges on whole float32 cache lines
constexpr int64_t kChunkRows = 128;  // rows per partial column sum (a bias's or scale's gradient)

// The BLAS's GEMMs, handed over by VitBlasGemmUse (vit/blas_gemm.cc); null until then.
inline GemmFn<float> g_sgemm = nullptr;
inline GemmFn<Bf16> g_bf16_gemm = nullptr;

// A future that is already complete, with `error` if it is not success.
inline ffi::Future Ready(ffi::Error error = ffi::Error::Success()) {
  ffi::Promise promise;
  ffi::Future future(promise);
  if (error.success()) {
    promise.SetAvailable();
  } else {
    promise.SetError(error);
  }
  return future;
}

// Runs slab_fn(lo, len) over [0, span) in one slab per pool thread (edges on multiples of
// `align`) and returns the future of their completion; a product below kSplitFlops, or of one
// slab, runs whole on the calling thread.
template <typename SlabFn>
ffi::Future InSlabs(ffi::ThreadPool& pool, int64_t span, int64_t align, double flops,
                    SlabFn slab_fn) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t slab = (span + threads - 1) / threads;
  slab = (slab + align - 1) / align * align;
  const int64_t slabs = (span + slab - 1) / slab;
  if (slabs <= 1 || flops < kSplitFlops) {
    slab_fn(0, span);
    return Ready();
  }
  ffi::Promise promise;
  ffi::Future future(promise);
  ffi::CountDownPromise done(promise, slabs);
  for (int64_t s = 0; s < slabs; ++s) {
    const int64_t lo = s * slab, len = std::min(slab, span - lo);
    pool.Schedule([=]() mutable {
      slab_fn(lo, len);
      done.CountDown();
    });
  }
  return future;
}

// The rows and columns of x [..., C]: true if x is float32 or bfloat16 of rank >= 1 and each of
// `same` has its dtype and element count.
inline bool RowsOf(const ffi::AnyBuffer& x, std::initializer_list<const ffi::AnyBuffer*> same,
                   int64_t* rows, int64_t* cols) {
  const auto d = x.dimensions();
  const ffi::DataType dtype = x.element_type();
  if (d.size() == 0 || (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16)) {
    return false;
  }
  *cols = d[d.size() - 1];
  *rows = *cols == 0 ? 0 : static_cast<int64_t>(x.element_count()) / *cols;
  for (const ffi::AnyBuffer* other : same) {
    if (other->element_type() != dtype || other->element_count() != x.element_count()) {
      return false;
    }
  }
  return true;
}

// Whether `b` holds n elements of `dtype`.
inline bool Holds(const ffi::AnyBuffer& b, ffi::DataType dtype, int64_t n) {
  return b.element_type() == dtype && static_cast<int64_t>(b.element_count()) == n;
}

// The chunks of kChunkRows rows (the last one short) in `rows`.
inline int64_t Chunks(int64_t rows) { return (rows + kChunkRows - 1) / kChunkRows; }

// run(kernel, (T*)nullptr): T = float with `f32` for float32 buffers (`dtype`), T = Bf16 with
// `bf16` for bfloat16 ones; the kernels are one function compiled for each.
template <typename Run, typename F32Kernel, typename Bf16Kernel>
ffi::Future ForDtype(ffi::DataType dtype, Run run, F32Kernel f32, Bf16Kernel bf16) {
  if (dtype == ffi::DataType::F32) {
    return run(f32, static_cast<float*>(nullptr));
  }
  return run(bf16, static_cast<Bf16*>(nullptr));
}

// ForDtype's run(kernel, gemm, (T*)nullptr) with the BLAS's GEMM for T (`cblas_sgemm`, the
// bfloat16 one); an error naming `who` where that GEMM was not handed over.
template <typename Run, typename F32Kernel, typename Bf16Kernel>
ffi::Future ForDtypeWithGemm(ffi::DataType dtype, const char* who, Run run, F32Kernel f32,
                             Bf16Kernel bf16) {
  const auto with_gemm = [&](auto kernel, auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    constexpr bool kF32 = std::is_same_v<T, float>;
    GemmFn<T> gemm;
    if constexpr (kF32) {
      gemm = g_sgemm;
    } else {
      gemm = g_bf16_gemm;
    }
    if (gemm == nullptr) {
      return Ready(ffi::Error::Internal(
          std::string(who) + (kF32 ? ": no cblas_sgemm handed over yet"
                                   : ": the BLAS handed over has no cblas_gemm_bf16bf16f32")));
    }
    return run(kernel, gemm, typed);
  };
  return ForDtype(dtype, with_gemm, f32, bf16);
}

}  // namespace vit_blas

#endif  // VIT_BLAS_KERNELS_H_
