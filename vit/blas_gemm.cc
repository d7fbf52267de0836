// GEMMs for XLA:CPU as asynchronous jax.ffi custom calls (vit/blas_gemm.py builds them), on
// float32 or bfloat16 operands, always summed into a float32 product.
//
// VitBlasGemm: y = op(x) @ op(w) on row-major 2-D buffers, trans_a reading x as [K, M] and
// trans_b reading w as [N, K]. VitBlasBatchedGemm: the same for each matrix of a batch, for
// attention; an operand is [G, R, C] (G matrices one after another) or [B, R, H, C] (B * H
// matrices, attention's q, k, v with the heads in the middle, read in place at row stride H * C).
// Both compute with a single-threaded BLAS: `cblas_sgemm` for float32 operands and
// `cblas_gemm_bf16bf16f32` for bfloat16 ones (MKL's, on the AMX tiles where the CPU has them),
// loaded by vit/blas_gemm.py and handed over through VitBlasGemmUse. A product is cut into one
// slab of rows, columns or batch per thread of XLA's own intra-op pool, each slab a task on that
// pool, and the handler returns at once with a future: XLA runs the ops that do not need the
// product meanwhile, as it does beside its own dots, and no second thread pool competes with
// XLA's for the cores.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "blas_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace {

using namespace vit_blas;  // NOLINT: the shared GEMM plumbing
namespace ffi = xla::ffi;

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

// Success if x, w, y are one product (2-D operands) or a batch of them (3-D or 4-D operands,
// `batched`) that fit together, described in `p`; else the error.
ffi::Error Prepare(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd,
                   ffi::Span<const int64_t> yd, bool trans_a, bool trans_b, bool batched,
                   Product* p) {
  const auto rank_fits = [batched](size_t rank) { return batched ? rank >= 3 : rank == 2; };
  if (!rank_fits(xd.size()) || !rank_fits(wd.size()) || !rank_fits(yd.size()) ||
      !Fit(xd, wd, yd, trans_a, trans_b, p)) {
    return ffi::Error::InvalidArgument(
        batched ? "vit blas_gemm takes batches of [M, K] x [K, N] matrices that agree"
                : "vit blas_gemm takes [M, K] x [K, N] operands");
  }
  return ffi::Error::Success();
}

// One product p of a [.., K] x w [K, ..] into c, in slabs of rows or columns.
template <typename T>
ffi::Future GemmOf(ffi::ThreadPool& pool, GemmFn<T> gemm, const Product& p, const T* a,
                   const T* b, float* c) {
  const double flops = 2.0 * p.m * p.n * p.k;
  const bool trans_a = p.ta == kTrans, trans_b = p.tb == kTrans;
  if (p.m >= p.n) {  // slabs of rows of op(x) and of y
    return InSlabs(pool, p.m, kSlabAlign, flops, [=](int64_t lo, int64_t len) {
      const T* a_rows = trans_a ? a + lo : a + lo * p.a.ld;
      gemm(kRowMajor, p.ta, p.tb, len, p.n, p.k, 1.0f, a_rows, p.a.ld, b, p.b.ld, 0.0f,
           c + lo * p.n, p.n);
    });
  }
  return InSlabs(pool, p.n, kSlabAlign, flops, [=](int64_t lo, int64_t len) {
    const T* b_cols = trans_b ? b + lo * p.b.ld : b + lo;  // slabs of columns
    gemm(kRowMajor, p.ta, p.tb, p.m, len, p.k, 1.0f, a, p.a.ld, b_cols, p.b.ld, 0.0f, c + lo,
         p.n);
  });
}

// The products of a batch p, in slabs of whole matrices.
template <typename T>
ffi::Future BatchedGemmOf(ffi::ThreadPool& pool, GemmFn<T> gemm, const Product& p, const T* a,
                          const T* b, float* c) {
  const double flops = 2.0 * p.c.count * p.m * p.n * p.k;
  return InSlabs(pool, p.c.count, 1, flops, [=](int64_t lo, int64_t len) {
    for (int64_t g = lo; g < lo + len; ++g) {
      gemm(kRowMajor, p.ta, p.tb, p.m, p.n, p.k, 1.0f, a + p.a.Offset(g), p.a.ld,
           b + p.b.Offset(g), p.b.ld, 0.0f, c + p.c.Offset(g), p.c.ld);
    }
  });
}

// Checks x, w, y and runs GemmOf (BatchedGemmOf if `batched`) with the GEMM of the operands'
// dtype.
ffi::Future Run(ffi::ThreadPool& pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                ffi::Result<ffi::Buffer<ffi::F32>> y, bool trans_a, bool trans_b, bool batched) {
  Product p;
  ffi::Error error = Prepare(x.dimensions(), w.dimensions(), y->dimensions(), trans_a, trans_b,
                             batched, &p);
  if (!error.success()) {
    return Ready(error);
  }
  const ffi::DataType dtype = x.element_type();
  if (w.element_type() != dtype || (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16)) {
    return Ready(ffi::Error::InvalidArgument(
        "vit blas_gemm takes two float32 or two bfloat16 operands"));
  }
  if (p.c.count == 0 || p.m == 0 || p.n == 0) {
    return Ready();
  }
  float* c = y->typed_data();
  const auto run = [&](auto /*kernel*/, auto gemm, auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    const T* a = static_cast<const T*>(x.untyped_data());
    const T* b = static_cast<const T*>(w.untyped_data());
    return batched ? BatchedGemmOf(pool, gemm, p, a, b, c) : GemmOf(pool, gemm, p, a, b, c);
  };
  // no kernel of its own: the product is the BLAS's GEMM
  return ForDtypeWithGemm(dtype, "vit blas_gemm", run, nullptr, nullptr);
}

ffi::Future Gemm(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                 ffi::Result<ffi::Buffer<ffi::F32>> y, bool trans_a, bool trans_b) {
  return Run(pool, x, w, y, trans_a, trans_b, /*batched=*/false);
}

ffi::Future BatchedGemm(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                        ffi::Result<ffi::Buffer<ffi::F32>> y, bool trans_a, bool trans_b) {
  return Run(pool, x, w, y, trans_a, trans_b, /*batched=*/true);
}

}  // namespace

// The BLAS's cblas_sgemm and cblas_gemm_bf16bf16f32 (null where it has none).
extern "C" void VitBlasGemmUse(void* sgemm, void* bf16_gemm) {
  g_sgemm = reinterpret_cast<GemmFn<float>>(sgemm);
  g_bf16_gemm = reinterpret_cast<GemmFn<Bf16>>(bf16_gemm);
}

#define VIT_BLAS_BINDING                  \
  ffi::Ffi::Bind()                        \
      .Ctx<ffi::ThreadPool>()             \
      .Arg<ffi::AnyBuffer>()              \
      .Arg<ffi::AnyBuffer>()              \
      .Ret<ffi::Buffer<ffi::F32>>()       \
      .Attr<bool>("trans_a")              \
      .Attr<bool>("trans_b")

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitBlasGemm, Gemm, VIT_BLAS_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(VitBlasBatchedGemm, BatchedGemm, VIT_BLAS_BINDING);
