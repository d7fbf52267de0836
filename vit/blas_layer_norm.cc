// LayerNorm over the last axis in asynchronous jax.ffi custom calls for XLA:CPU (vit/blas_gemm.py
// builds them with vit/blas_gemm.cc; vit/fused_layer_norm.py calls them): VitLayerNorm, the
// forward pass, and VitLayerNormGrad, its gradient.
//
// XLA:CPU runs LayerNorm in several passes over memory, and in its gradient fuses each row's two
// sums into the loop that broadcasts them, recomputing them for every element (192 times a row
// at width 192). Here each row stays in the cache between its passes: the forward reads x once
// and writes y = (x - mean) * (rstd * scale) + bias (the mean and variance in float32, the
// variance two-pass: the mean of (x - mean)^2), with each row's mean and rstd for the gradient;
// the gradient reads x and dy once and writes dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
// g = dy * scale, xhat = (x - mean) * rstd, and the partial sums of dy * xhat and dy (the scale's
// and bias's gradients) per chunk of kChunkRows rows, which the caller adds: the same sums in
// the same order whatever the number of threads. x, y, dy and dx are float32 or bfloat16 (bits),
// all one dtype; scale, bias and the statistics float32. Work is one slab of rows (chunks) per
// thread of XLA's pool.
#include <cmath>
#include <algorithm>
#include <cstdint>
#include <vector>

#include "blas_kernels.h"
#include "blas_lanes.h"
#include "xla/ffi/api/ffi.h"

namespace {

using namespace vit_blas;  // NOLINT: the shared plumbing
namespace ffi = xla::ffi;

// Row r of x, widened to float32 into `row`; returns its sum (kLanes partial sums, in order).
template <typename T>
VIT_INLINE float WidenRow(const T* x, int64_t cols, float* row) {
  Floats lanes = {};
  for (int64_t j = 0; j < cols; j += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, cols - j);
    const Floats v = Load(x + j, n);
    Store(row + j, v, n);
    lanes += v;
  }
  return Sum(lanes);
}

// The mean and 1 / sqrt(variance + epsilon) of a float32 row.
VIT_INLINE void Statistics(const float* row, int64_t cols, float sum, float epsilon, float* mean,
                           float* rstd) {
  const float mu = sum / static_cast<float>(cols);
  Floats lanes = {};
  for (int64_t j = 0; j < cols; j += kLanes) {
    const Floats d = Load(row + j, cols - j, mu) - mu;  // lanes past the row: 0
    lanes += d * d;
  }
  *mean = mu;
  *rstd = 1.0f / std::sqrt(Sum(lanes) / static_cast<float>(cols) + epsilon);
}

template <typename T>
VIT_INLINE void NormRows(const T* x, const float* scale, const float* bias, T* y, float* mean,
                         float* rstd, int64_t cols, float epsilon, int64_t lo, int64_t len) {
  std::vector<float> row(cols);
  for (int64_t r = lo; r < lo + len; ++r) {
    const float sum = WidenRow(x + r * cols, cols, row.data());
    Statistics(row.data(), cols, sum, epsilon, mean + r, rstd + r);
    const float mu = mean[r], rs = rstd[r];
    for (int64_t j = 0; j < cols; j += kLanes) {
      const int64_t n = std::min<int64_t>(kLanes, cols - j);
      const Floats v = (Load(row.data() + j, n) - mu) * (rs * Load(scale + j, n)) +
                       Load(bias + j, n);
      Store(y + r * cols + j, v, n);
    }
  }
}

// Chunks [lo, lo + len) of the gradient: dx and each chunk's partial sums d_scale and d_bias.
template <typename T>
VIT_INLINE void NormGradChunks(const T* x, const float* scale, const float* mean,
                               const float* rstd, const T* dy, T* dx, float* d_scale,
                               float* d_bias, int64_t rows, int64_t cols, int64_t lo,
                               int64_t len) {
  std::vector<float> xs(cols), gs(cols);
  for (int64_t c = lo; c < lo + len; ++c) {
    float* ds = d_scale + c * cols;
    float* db = d_bias + c * cols;
    std::fill(ds, ds + cols, 0.0f);
    std::fill(db, db + cols, 0.0f);
    for (int64_t r = c * kChunkRows; r < std::min(rows, (c + 1) * kChunkRows); ++r) {
      const float mu = mean[r], rs = rstd[r];
      Floats a_lanes = {}, b_lanes = {};
      for (int64_t j = 0; j < cols; j += kLanes) {
        const int64_t n = std::min<int64_t>(kLanes, cols - j);
        const Floats xhat = (Load(x + r * cols + j, n) - mu) * rs;
        const Floats d = Load(dy + r * cols + j, n);
        const Floats g = d * Load(scale + j, n);
        Store(xs.data() + j, xhat, n);
        Store(gs.data() + j, g, n);
        Store(ds + j, Load(ds + j, n) + d * xhat, n);
        Store(db + j, Load(db + j, n) + d, n);
        a_lanes += g;  // lanes past the row: g = 0
        b_lanes += g * xhat;
      }
      const float a = Sum(a_lanes) / static_cast<float>(cols);
      const float b = Sum(b_lanes) / static_cast<float>(cols);
      for (int64_t j = 0; j < cols; j += kLanes) {
        const int64_t n = std::min<int64_t>(kLanes, cols - j);
        Store(dx + r * cols + j, rs * (Load(gs.data() + j, n) - a - Load(xs.data() + j, n) * b),
              n);
      }
    }
  }
}

// NormRows and NormGradChunks for float32 and for bfloat16 x.
void NormF32(const float* x, const float* scale, const float* bias, float* y,
             float* mean, float* rstd, int64_t cols, float epsilon, int64_t lo,
             int64_t len) {
  NormRows<float>(x, scale, bias, y, mean, rstd, cols, epsilon, lo, len);
}
void NormBf16(const Bf16* x, const float* scale, const float* bias, Bf16* y,
              float* mean, float* rstd, int64_t cols, float epsilon, int64_t lo,
              int64_t len) {
  NormRows<Bf16>(x, scale, bias, y, mean, rstd, cols, epsilon, lo, len);
}
void NormGradF32(const float* x, const float* scale, const float* mean,
                 const float* rstd, const float* dy, float* dx, float* d_scale,
                 float* d_bias, int64_t rows, int64_t cols, int64_t lo, int64_t len) {
  NormGradChunks<float>(x, scale, mean, rstd, dy, dx, d_scale, d_bias, rows, cols, lo, len);
}
void NormGradBf16(const Bf16* x, const float* scale, const float* mean,
                  const float* rstd, const Bf16* dy, Bf16* dx, float* d_scale,
                  float* d_bias, int64_t rows, int64_t cols, int64_t lo, int64_t len) {
  NormGradChunks<Bf16>(x, scale, mean, rstd, dy, dx, d_scale, d_bias, rows, cols, lo, len);
}

// Rows and columns of x [..., C]; false unless x is float32 or bfloat16 of rank >= 1, `same`
// arrays of its dtype and size, and `per_column` float32 arrays [C].
bool Fits(const ffi::AnyBuffer& x, std::initializer_list<const ffi::AnyBuffer*> same,
          std::initializer_list<const ffi::AnyBuffer*> per_column, int64_t* rows, int64_t* cols) {
  if (!RowsOf(x, same, rows, cols)) {
    return false;
  }
  for (const ffi::AnyBuffer* column : per_column) {
    if (!Holds(*column, ffi::DataType::F32, *cols)) {
      return false;
    }
  }
  return true;
}

ffi::Future Norm(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                 ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                 ffi::Result<ffi::Buffer<ffi::F32>> mean, ffi::Result<ffi::Buffer<ffi::F32>> rstd,
                 float epsilon) {
  int64_t rows = 0, cols = 0;
  if (!Fits(x, {&*y}, {&scale, &bias}, &rows, &cols) ||
      static_cast<int64_t>(mean->element_count()) != rows ||
      static_cast<int64_t>(rstd->element_count()) != rows) {
    return Ready(ffi::Error::InvalidArgument(
        "vit layer_norm takes float32 or bfloat16 x [..., C], float32 scale and bias [C], and "
        "returns y like x and float32 mean and rstd, one per row"));
  }
  if (rows == 0 || cols == 0) {
    return Ready();
  }
  const auto* sp = static_cast<const float*>(scale.untyped_data());
  const auto* bp = static_cast<const float*>(bias.untyped_data());
  float* mp = mean->typed_data();
  float* rp = rstd->typed_data();
  const double work = 10.0 * rows * cols;
  const auto run = [&](auto norm, auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    const auto* xp = static_cast<const T*>(x.untyped_data());
    auto* yp = static_cast<T*>(y->untyped_data());
    return InSlabs(pool, rows, kSlabAlign, work, [=](int64_t lo, int64_t len) {
      norm(xp, sp, bp, yp, mp, rp, cols, epsilon, lo, len);
    });
  };
  return ForDtype(x.element_type(), run, NormF32, NormBf16);
}

ffi::Future NormGrad(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                     ffi::AnyBuffer mean, ffi::AnyBuffer rstd, ffi::AnyBuffer dy,
                     ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::Buffer<ffi::F32>> d_scale,
                     ffi::Result<ffi::Buffer<ffi::F32>> d_bias) {
  int64_t rows = 0, cols = 0;
  bool fits = Fits(x, {&dy, &*dx}, {&scale}, &rows, &cols);
  const int64_t chunks = Chunks(rows);
  fits = fits && Holds(mean, ffi::DataType::F32, rows) && Holds(rstd, ffi::DataType::F32, rows) &&
         static_cast<int64_t>(d_scale->element_count()) == chunks * cols &&
         static_cast<int64_t>(d_bias->element_count()) == chunks * cols;
  if (!fits) {
    return Ready(ffi::Error::InvalidArgument(
        "vit layer_norm_grad takes x and dy [..., C] of one dtype, float32 scale [C], the "
        "forward's mean and rstd, and returns dx and the partial sums [ceil(rows / 128), C]"));
  }
  if (rows == 0 || cols == 0) {
    return Ready();
  }
  const auto* sp = static_cast<const float*>(scale.untyped_data());
  const auto* mp = static_cast<const float*>(mean.untyped_data());
  const auto* rp = static_cast<const float*>(rstd.untyped_data());
  float* dsp = d_scale->typed_data();
  float* dbp = d_bias->typed_data();
  const double work = 16.0 * rows * cols;
  const auto run = [&](auto norm_grad, auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    const auto* xp = static_cast<const T*>(x.untyped_data());
    const auto* dyp = static_cast<const T*>(dy.untyped_data());
    auto* dxp = static_cast<T*>(dx->untyped_data());
    return InSlabs(pool, chunks, 1, work, [=](int64_t lo, int64_t len) {
      norm_grad(xp, sp, mp, rp, dyp, dxp, dsp, dbp, rows, cols, lo, len);
    });
  };
  return ForDtype(x.element_type(), run, NormGradF32, NormGradBf16);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitLayerNorm, Norm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitLayerNormGrad, NormGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
