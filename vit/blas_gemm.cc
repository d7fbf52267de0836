// Float32 GEMMs for XLA:CPU as asynchronous jax.ffi custom calls (vit/blas_gemm.py builds them).
//
// VitBlasGemm: y = op(x) @ op(w) on row-major 2-D buffers, trans_a reading x as [K, M] and
// trans_b reading w as [N, K]. VitBlasBatchedGemm: the same for each matrix of a batch, for
// attention; an operand is [G, R, C] (G matrices one after another) or [B, R, H, C] (B * H
// matrices, attention's q, k, v with the heads in the middle, read in place at row stride H * C).
// Both compute with a single-threaded BLAS `cblas_sgemm` (MKL's, loaded by vit/blas_gemm.py and
// handed over through VitBlasGemmUse). A product is cut into one slab of rows, columns or batch
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
constexpr int64_t kSlabAlign = 16;   // row and column slab edges on whole float32 cache lines

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

// The row-major matrices of an operand: [R, C] is one; [G, R, C] is G one after another;
// [B, R, H, C] is B * H, matrix g = b * H + h starting at b * R * H * C + h * C with rows
// H * C apart.
struct Matrices {
  int64_t count = 0, rows = 0, cols = 0, ld = 0, heads = 1, b_stride = 0, h_stride = 0;

  int64_t Offset(int64_t g) const { return g / heads * b_stride + g % heads * h_stride; }
};

bool Describe(ffi::Span<const int64_t> d, Matrices* m) {
  switch (d.size()) {
    case 2:
      *m = {1, d[0], d[1], d[1], 1, 0, 0};
      return true;
    case 3:
      *m = {d[0], d[1], d[2], d[2], 1, d[1] * d[2], 0};
      return true;
    case 4:
      *m = {d[0] * d[2], d[1], d[3], d[2] * d[3], d[2], d[1] * d[2] * d[3], d[3]};
      return true;
    default:
      return false;
  }
}

// The operands' matrices and the product's m, n, k; false unless they fit together.
struct Product {
  Matrices a, b, c;
  int64_t m = 0, n = 0, k = 0;
  int ta = kNoTrans, tb = kNoTrans;
};

bool Fit(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd,
         ffi::Span<const int64_t> yd, bool trans_a, bool trans_b, Product* p) {
  if (!Describe(xd, &p->a) || !Describe(wd, &p->b) || !Describe(yd, &p->c)) {
    return false;
  }
  p->m = trans_a ? p->a.cols : p->a.rows;
  p->k = trans_a ? p->a.rows : p->a.cols;
  p->n = trans_b ? p->b.rows : p->b.cols;
  p->ta = trans_a ? kTrans : kNoTrans;
  p->tb = trans_b ? kTrans : kNoTrans;
  return (trans_b ? p->b.cols : p->b.rows) == p->k && p->c.rows == p->m && p->c.cols == p->n &&
         p->a.count == p->c.count && p->b.count == p->c.count;
}

// Success if `sgemm` is set and x, w, y are one product (2-D operands) or a batch of them
// (3-D or 4-D operands, `batched`) that fit together, described in `p`; else the error.
ffi::Error Prepare(Sgemm sgemm, ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd,
                   ffi::Span<const int64_t> yd, bool trans_a, bool trans_b, bool batched,
                   Product* p) {
  if (sgemm == nullptr) {
    return ffi::Error::Internal("vit blas_gemm: no cblas_sgemm handed over yet");
  }
  const auto rank_fits = [batched](size_t rank) { return batched ? rank >= 3 : rank == 2; };
  if (!rank_fits(xd.size()) || !rank_fits(wd.size()) || !rank_fits(yd.size()) ||
      !Fit(xd, wd, yd, trans_a, trans_b, p)) {
    return ffi::Error::InvalidArgument(
        batched ? "vit blas_gemm takes batches of [M, K] x [K, N] matrices that agree"
                : "vit blas_gemm takes [M, K] x [K, N] operands");
  }
  return ffi::Error::Success();
}

ffi::Future Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                 ffi::ResultBuffer<ffi::F32> y, bool trans_a, bool trans_b) {
  const Sgemm sgemm = g_sgemm;
  Product p;
  ffi::Error error = Prepare(sgemm, x.dimensions(), w.dimensions(), y->dimensions(), trans_a,
                             trans_b, /*batched=*/false, &p);
  if (!error.success()) {
    return Ready(error);
  }
  const float* a = x.typed_data();
  const float* b = w.typed_data();
  float* c = y->typed_data();
  if (p.m == 0 || p.n == 0) {
    return Ready();
  }
  const double flops = 2.0 * p.m * p.n * p.k;
  if (p.m >= p.n) {  // slabs of rows of op(x) and of y
    return InSlabs(pool, p.m, kSlabAlign, flops, [=](int64_t lo, int64_t len) {
      const float* a_rows = trans_a ? a + lo : a + lo * p.a.ld;
      sgemm(kRowMajor, p.ta, p.tb, len, p.n, p.k, 1.0f, a_rows, p.a.ld, b, p.b.ld, 0.0f,
            c + lo * p.n, p.n);
    });
  }
  return InSlabs(pool, p.n, kSlabAlign, flops, [=](int64_t lo, int64_t len) {
    const float* b_cols = trans_b ? b + lo * p.b.ld : b + lo;  // slabs of columns
    sgemm(kRowMajor, p.ta, p.tb, p.m, len, p.k, 1.0f, a, p.a.ld, b_cols, p.b.ld, 0.0f, c + lo,
          p.n);
  });
}

ffi::Future BatchedGemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y, bool trans_a, bool trans_b) {
  const Sgemm sgemm = g_sgemm;
  Product p;
  ffi::Error error = Prepare(sgemm, x.dimensions(), w.dimensions(), y->dimensions(), trans_a,
                             trans_b, /*batched=*/true, &p);
  if (!error.success()) {
    return Ready(error);
  }
  const float* a = x.typed_data();
  const float* b = w.typed_data();
  float* c = y->typed_data();
  if (p.c.count == 0 || p.m == 0 || p.n == 0) {
    return Ready();
  }
  const double flops = 2.0 * p.c.count * p.m * p.n * p.k;
  return InSlabs(pool, p.c.count, 1, flops, [=](int64_t lo, int64_t len) {
    for (int64_t g = lo; g < lo + len; ++g) {
      sgemm(kRowMajor, p.ta, p.tb, p.m, p.n, p.k, 1.0f, a + p.a.Offset(g), p.a.ld,
            b + p.b.Offset(g), p.b.ld, 0.0f, c + p.c.Offset(g), p.c.ld);
    }
  });
}

}  // namespace

extern "C" void VitBlasGemmUse(void* sgemm) { g_sgemm = reinterpret_cast<Sgemm>(sgemm); }

#define VIT_BLAS_BINDING                  \
  ffi::Ffi::Bind()                        \
      .Ctx<ffi::ThreadPool>()             \
      .Arg<ffi::Buffer<ffi::F32>>()       \
      .Arg<ffi::Buffer<ffi::F32>>()       \
      .Ret<ffi::Buffer<ffi::F32>>()       \
      .Attr<bool>("trans_a")              \
      .Attr<bool>("trans_b")

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitBlasGemm, Gemm, VIT_BLAS_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(VitBlasBatchedGemm, BatchedGemm, VIT_BLAS_BINDING);
