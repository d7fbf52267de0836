// The MLP's bias and tanh GELU in asynchronous jax.ffi custom calls for XLA:CPU (vit/blas_gemm.py
// builds them with vit/blas_gemm.cc; vit/fused_gelu.py calls them): VitBiasGelu, the forward
// pass, and VitBiasGeluGrad, its gradient.
//
// On XLA's ops the MLP's first layer took five passes over its [tokens, mlp_dim] output: the
// tanh written to memory, the product read back, the gradient reading both again, the bias's
// gradient another. Here the forward reads the product h and writes a = gelu(h + bias) once,
// and the gradient reads h and da once and writes d(h + bias) with its partial column sums per
// chunk of kChunkRows rows (the bias's gradient, which the caller adds: the same sums whatever
// the number of threads). gelu(x) = x * sigmoid(2u) with u = sqrt(2 / pi) (x + 0.044715 x^3):
// 0.5 x (1 + tanh(u)) written without its cancellation. h, a, da and the gradient are float32 or
// bfloat16 (bits), bias the same dtype; the arithmetic is float32. Work is one slab of rows
// (chunks) per thread of XLA's pool.
#include <algorithm>
#include <cstdint>

#include "blas_kernels.h"
#include "blas_lanes.h"
#include "xla/ffi/api/ffi.h"

namespace {

using namespace vit_blas;  // NOLINT: the shared plumbing
namespace ffi = xla::ffi;

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;

// sigmoid(2u) of x, and 2 du/dx.
VIT_INLINE Floats Gate(Floats x, Floats* du2) {
  const Floats x2 = x * x;
  const Floats u = kSqrt2OverPi * (x + kCubic * x2 * x);
  *du2 = 2.0f * kSqrt2OverPi * (1.0f + 3.0f * kCubic * x2);
  return 1.0f / (1.0f + Exp(-2.0f * u));
}

// Row r's features [0, cols) of h + bias, rounded to T as XLA's add of two T arrays rounds.
template <typename T>
VIT_INLINE Floats Biased(const T* h, const T* bias, int64_t r, int64_t cols, int64_t j,
                         int64_t n) {
  return RoundTo<T>(Load(h + r * cols + j, n) + Load(bias + j, n));
}

template <typename T>
VIT_INLINE void GeluRows(const T* h, const T* bias, T* a, int64_t cols, int64_t lo,
                         int64_t len) {
  for (int64_t r = lo; r < lo + len; ++r) {
    for (int64_t j = 0; j < cols; j += kLanes) {
      const int64_t n = std::min<int64_t>(kLanes, cols - j);
      const Floats x = Biased(h, bias, r, cols, j, n);
      Floats du2;
      Store(a + r * cols + j, x * Gate(x, &du2), n);
    }
  }
}

// Chunks [lo, lo + len): d(h + bias) = da * gelu'(h + bias), and its column sums per chunk.
template <typename T>
VIT_INLINE void GeluGradChunks(const T* h, const T* bias, const T* da, T* dx, float* d_bias,
                               int64_t rows, int64_t cols, int64_t lo, int64_t len) {
  for (int64_t c = lo; c < lo + len; ++c) {
    float* db = d_bias + c * cols;
    std::fill(db, db + cols, 0.0f);
    for (int64_t r = c * kChunkRows; r < std::min(rows, (c + 1) * kChunkRows); ++r) {
      for (int64_t j = 0; j < cols; j += kLanes) {
        const int64_t n = std::min<int64_t>(kLanes, cols - j);
        const Floats x = Biased(h, bias, r, cols, j, n);
        Floats du2;
        const Floats s = Gate(x, &du2);
        const Floats d = RoundTo<T>(Load(da + r * cols + j, n) * (s + x * s * (1.0f - s) * du2));
        Store(dx + r * cols + j, d, n);
        Store(db + j, Load(db + j, n) + d, n);
      }
    }
  }
}

// GeluRows and GeluGradChunks for float32 and for bfloat16.
void GeluF32(const float* h, const float* bias, float* a, int64_t cols, int64_t lo,
             int64_t len) {
  GeluRows<float>(h, bias, a, cols, lo, len);
}
void GeluBf16(const Bf16* h, const Bf16* bias, Bf16* a, int64_t cols, int64_t lo,
              int64_t len) {
  GeluRows<Bf16>(h, bias, a, cols, lo, len);
}
void GeluGradF32(const float* h, const float* bias, const float* da, float* dx,
                 float* d_bias, int64_t rows, int64_t cols, int64_t lo, int64_t len) {
  GeluGradChunks<float>(h, bias, da, dx, d_bias, rows, cols, lo, len);
}
void GeluGradBf16(const Bf16* h, const Bf16* bias, const Bf16* da, Bf16* dx,
                  float* d_bias, int64_t rows, int64_t cols, int64_t lo, int64_t len) {
  GeluGradChunks<Bf16>(h, bias, da, dx, d_bias, rows, cols, lo, len);
}

// Rows and columns of h [..., C]; false unless h is float32 or bfloat16 of rank >= 1, `same` are
// arrays of its dtype and size, and bias [C] of its dtype.
bool Fits(const ffi::AnyBuffer& h, const ffi::AnyBuffer& bias,
          std::initializer_list<const ffi::AnyBuffer*> same, int64_t* rows, int64_t* cols) {
  return RowsOf(h, same, rows, cols) && Holds(bias, h.element_type(), *cols);
}

ffi::Future Gelu(ffi::ThreadPool pool, ffi::AnyBuffer h, ffi::AnyBuffer bias,
                 ffi::Result<ffi::AnyBuffer> a) {
  int64_t rows = 0, cols = 0;
  if (!Fits(h, bias, {&*a}, &rows, &cols)) {
    return Ready(ffi::Error::InvalidArgument(
        "vit bias_gelu takes float32 or bfloat16 h [..., C] and bias [C] of its dtype, and "
        "returns an array like h"));
  }
  if (rows == 0 || cols == 0) {
    return Ready();
  }
  const double work = 30.0 * rows * cols;
  const auto run = [&](auto gelu, auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    const auto* hp = static_cast<const T*>(h.untyped_data());
    const auto* bp = static_cast<const T*>(bias.untyped_data());
    auto* ap = static_cast<T*>(a->untyped_data());
    return InSlabs(pool, rows, kSlabAlign, work,
                   [=](int64_t lo, int64_t len) { gelu(hp, bp, ap, cols, lo, len); });
  };
  return ForDtype(h.element_type(), run, GeluF32, GeluBf16);
}

ffi::Future GeluGrad(ffi::ThreadPool pool, ffi::AnyBuffer h, ffi::AnyBuffer bias,
                     ffi::AnyBuffer da, ffi::Result<ffi::AnyBuffer> dx,
                     ffi::Result<ffi::Buffer<ffi::F32>> d_bias) {
  int64_t rows = 0, cols = 0;
  const bool fits = Fits(h, bias, {&da, &*dx}, &rows, &cols);
  const int64_t chunks = Chunks(rows);
  if (!fits || static_cast<int64_t>(d_bias->element_count()) != chunks * cols) {
    return Ready(ffi::Error::InvalidArgument(
        "vit bias_gelu_grad takes h and da [..., C] and bias [C] of one dtype, and returns the "
        "gradient like h and the bias's partial sums [ceil(rows / 128), C]"));
  }
  if (rows == 0 || cols == 0) {
    return Ready();
  }
  float* dbp = d_bias->typed_data();
  const double work = 40.0 * rows * cols;
  const auto run = [&](auto gelu_grad, auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    const auto* hp = static_cast<const T*>(h.untyped_data());
    const auto* bp = static_cast<const T*>(bias.untyped_data());
    const auto* dap = static_cast<const T*>(da.untyped_data());
    auto* dxp = static_cast<T*>(dx->untyped_data());
    return InSlabs(pool, chunks, 1, work, [=](int64_t lo, int64_t len) {
      gelu_grad(hp, bp, dap, dxp, dbp, rows, cols, lo, len);
    });
  };
  return ForDtype(h.element_type(), run, GeluGradF32, GeluGradBf16);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitBiasGelu, Gelu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitBiasGeluGrad, GeluGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
