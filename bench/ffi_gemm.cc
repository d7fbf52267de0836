// A float32 GEMM for XLA:CPU as a jax.ffi custom call, handing the product to the cblas_sgemm
// of whatever BLAS the process has loaded (bench/ffi_gemm.py loads MKL's libmkl_rt first).
// Operands are row-major 2-D buffers; trans_a / trans_b read x as [K, M] and w as [N, K].
#include <dlfcn.h>

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Sgemm = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                       const float* a, int lda, const float* b, int ldb, float beta, float* c,
                       int ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

ffi::Error Gemm(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                int64_t trans_a, int64_t trans_b) {
  static const Sgemm sgemm = reinterpret_cast<Sgemm>(dlsym(RTLD_DEFAULT, "cblas_sgemm"));
  if (sgemm == nullptr) {
    return ffi::Error::Internal("no cblas_sgemm in the process: load a BLAS library first");
  }
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) {
    return ffi::Error::InvalidArgument("ffi_gemm takes 2-D operands");
  }
  const int64_t m = trans_a ? xd[1] : xd[0], k = trans_a ? xd[0] : xd[1];
  const int64_t n = trans_b ? wd[0] : wd[1];
  if ((trans_b ? wd[1] : wd[0]) != k) {
    return ffi::Error::InvalidArgument("ffi_gemm operands disagree on the contracted size");
  }
  sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, m, n, k, 1.0f,
        x.typed_data(), xd[1], w.typed_data(), wd[1], 0.0f, y->typed_data(), n);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FfiGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("trans_a")
                                  .Attr<int64_t>("trans_b"));
