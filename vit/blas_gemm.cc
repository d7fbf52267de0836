// A float32 GEMM for XLA:CPU as an asynchronous jax.ffi custom call (vit/blas_gemm.py builds it).
//
// y = op(x) @ op(w) on row-major 2-D buffers, trans_a reading x as [K, M] and trans_b reading w
// as [N, K], computed by a single-threaded BLAS `cblas_sgemm` (MKL's, loaded by vit/blas_gemm.py
// and handed over through VitBlasGemmUse). The product is cut into one slab of rows (or columns)
// per thread of XLA's own intra-op pool, each slab a task on that pool, and the handler returns
// at once with a future: XLA runs the ops that do not need the product meanwhile, as it does
// beside its own dots, and no second thread pool competes with XLA's for the cores.
#include <algorithm>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Sgemm = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                       const float* a, int lda, const float* b, int ldb, float beta, float* c,
                       int ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr double kSplitFlops = 4e6;  // smaller products run whole, on the calling thread
constexpr int64_t kSlabAlign = 16;   // slab edges on whole cache lines of float32

Sgemm g_sgemm = nullptr;

ffi::Future Ready(ffi::Error error = ffi::Error::Success()) {
  ffi::Promise promise;
  ffi::Future future(promise);
  if (error.success()) {
    promise.SetAvailable();
  } else {
    promise.SetError(error);
  }
  return future;
}

// Runs slabs 0..slabs-1 of a product on XLA's pool and returns the future of their completion;
// a product below kSplitFlops, or of one slab, runs whole on the calling thread.
template <typename Slab>
ffi::Future InSlabs(ffi::ThreadPool& pool, int64_t span, int64_t align, double flops,
                    Slab slab_fn) {
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

struct Shape {
  int64_t m, n, k, lda, ldb;
  int ta, tb;
};

// The row-major GEMM of the last two axes of x and w; false if they disagree on K.
bool GemmShape(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd, bool trans_a, bool trans_b, Shape* s) {
  const size_t r = xd.size();
  s->m = trans_a ? xd[r - 1] : xd[r - 2];
  s->k = trans_a ? xd[r - 2] : xd[r - 1];
  s->n = trans_b ? wd[r - 2] : wd[r - 1];
  s->lda = xd[r - 1];
  s->ldb = wd[r - 1];
  s->ta = trans_a ? kTrans : kNoTrans;
  s->tb = trans_b ? kTrans : kNoTrans;
  return (trans_b ? wd[r - 1] : wd[r - 2]) == s->k;
}

ffi::Future Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                 ffi::ResultBuffer<ffi::F32> y, bool trans_a, bool trans_b) {
  const Sgemm sgemm = g_sgemm;
  if (sgemm == nullptr) {
    return Ready(ffi::Error::Internal("vit blas_gemm: no cblas_sgemm handed over yet"));
  }
  Shape s;
  if (x.dimensions().size() != 2 || w.dimensions().size() != 2 ||
      !GemmShape(x.dimensions(), w.dimensions(), trans_a, trans_b, &s)) {
    return Ready(ffi::Error::InvalidArgument("vit blas_gemm takes [M, K] x [K, N] operands"));
  }
  const float* a = x.typed_data();
  const float* b = w.typed_data();
  float* c = y->typed_data();
  if (s.m == 0 || s.n == 0) {
    return Ready();
  }
  const double flops = 2.0 * s.m * s.n * s.k;
  if (s.m >= s.n) {  // slabs of rows of op(x) and of y
    return InSlabs(pool, s.m, kSlabAlign, flops, [=](int64_t lo, int64_t len) {
      const float* a_rows = trans_a ? a + lo : a + lo * s.lda;
      sgemm(kRowMajor, s.ta, s.tb, len, s.n, s.k, 1.0f, a_rows, s.lda, b, s.ldb, 0.0f,
            c + lo * s.n, s.n);
    });
  }
  return InSlabs(pool, s.n, kSlabAlign, flops, [=](int64_t lo, int64_t len) {
    const float* b_cols = trans_b ? b + lo * s.ldb : b + lo;  // slabs of columns
    sgemm(kRowMajor, s.ta, s.tb, s.m, len, s.k, 1.0f, a, s.lda, b_cols, s.ldb, 0.0f, c + lo,
          s.n);
  });
}

// The same product for each of a leading batch of matrices, x [B, M, K] and w [B, K, N] (or
// transposed as in Gemm): attention's batched matmuls, one slab of the batch per thread.
ffi::Future BatchedGemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y, bool trans_a, bool trans_b) {
  const Sgemm sgemm = g_sgemm;
  if (sgemm == nullptr) {
    return Ready(ffi::Error::Internal("vit blas_gemm: no cblas_sgemm handed over yet"));
  }
  Shape s;
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 3 || wd.size() != 3 || xd[0] != wd[0] ||
      !GemmShape(xd, wd, trans_a, trans_b, &s)) {
    return Ready(ffi::Error::InvalidArgument(
        "vit blas_gemm takes [B, M, K] x [B, K, N] batched operands"));
  }
  const float* a = x.typed_data();
  const float* b = w.typed_data();
  float* c = y->typed_data();
  const int64_t a_size = xd[1] * xd[2], b_size = wd[1] * wd[2], c_size = s.m * s.n;
  if (xd[0] == 0 || c_size == 0) {
    return Ready();
  }
  return InSlabs(pool, xd[0], 1, 2.0 * xd[0] * c_size * s.k, [=](int64_t lo, int64_t len) {
    for (int64_t i = lo; i < lo + len; ++i) {
      sgemm(kRowMajor, s.ta, s.tb, s.m, s.n, s.k, 1.0f, a + i * a_size, s.lda, b + i * b_size,
            s.ldb, 0.0f, c + i * c_size, s.n);
    }
  });
}

}  // namespace

extern "C" void VitBlasGemmUse(void* sgemm) { g_sgemm = reinterpret_cast<Sgemm>(sgemm); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitBlasGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitBlasBatchedGemm, BatchedGemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
