// Softmax attention's forward pass in one asynchronous jax.ffi custom call for XLA:CPU
// (vit/blas_gemm.py builds it with vit/blas_gemm.cc): VitBlasAttention.
//
// For each (batch, head) and block of queries: logits = (q * scale) k^T by the BLAS into float32,
// each row's exp(logit - row max) and its sum, those exponentials (rounded to the operands'
// dtype) times v by the BLAS, and the rows divided by their sums: the order of vit/attention.py's
// `_attend_fwd`. The logits never leave the cache: on XLA's ops they took five passes over a
// [B, heads, T, T] float32 array in memory. Operands are float32 or bfloat16 (bits); q is
// [B, Tq, Cq], k and v [B, Tk, Ck] and [B, Tk, Cv], head h's columns starting at the call's
// q_col, k_col, v_col + h * head_dim, so that q, k and v can be read in place from the fused
// projection's output [B, T, 3 * heads * head_dim], whose bias [3 * heads * head_dim] (in q,
// k, v's dtype, or empty) is added as they are read. The output is [B, Tq, heads, head_dim] in
// the operands' dtype. Work is one slab of (batch, head) pairs per thread of XLA's pool.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "blas_kernels.h"
#include "blas_lanes.h"
#include "xla/ffi/api/ffi.h"

namespace {

using namespace vit_blas;  // NOLINT: the shared GEMM plumbing
namespace ffi = xla::ffi;

constexpr int64_t kBlockFloats = 1 << 18;  // a block's logits: at most 1 MiB of float32
// Each of `rows` rows of `cols` logits (row stride `cols`) becomes exp(logit - row max), in
// place; sums[i] gets row i's sum, summed in kLanes lanes in the same order on any CPU.
VIT_INLINE void ExpRows(float* s, int64_t rows, int64_t cols, float* sums) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * cols;
    Floats tops = Floats{} + row[0];
    for (int64_t j = 0; j < cols; j += kLanes) {
      const Floats x = Load(row + j, cols - j, row[0]);
      tops = x > tops ? x : tops;
    }
    float top = tops[0];
    for (int l = 1; l < kLanes; ++l) {
      top = tops[l] > top ? tops[l] : top;
    }
    Floats lanes = {};
    int64_t j = 0;
    for (; j + kLanes <= cols; j += kLanes) {
      const Floats e = Exp(Load(row + j, kLanes) - top);
      std::memcpy(row + j, &e, sizeof e);
      lanes += e;
    }
    if (j < cols) {
      const Floats e = Exp(Load(row + j, cols - j, top) - top);
      for (int64_t l = 0; l < cols - j; ++l) {
        row[j + l] = e[l];
        lanes[l] += e[l];
      }
    }
    float sum = 0.0f;
    for (int l = 0; l < kLanes; ++l) {
      sum += lanes[l];
    }
    sums[i] = sum;
  }
}

struct Shape {
  int64_t batch = 0, tq = 0, tk = 0, heads = 0, dim = 0, cq = 0, ck = 0, cv = 0;
  int64_t q_col = 0, k_col = 0, v_col = 0;
};

// The attention of pairs [lo, lo + len) of (batch, head) = (g / heads, g % heads) on T (float
// or Bf16) q, k, v. A `bias` (or null) has q's columns: it is added to q and, at k_col and
// v_col, to k and v.
template <typename T>
VIT_INLINE void AttendPairs(GemmFn<T> gemm, const Shape& s, float scale, const T* q,
                            const T* k, const T* v, const T* bias, T* y, int64_t lo,
                            int64_t len) {
  constexpr bool kRoundsProbs = !std::is_same_v<T, float>;  // bfloat16 exponentials
  const int64_t block = std::clamp<int64_t>(kBlockFloats / std::max<int64_t>(s.tk, 1), 1, s.tq);
  std::vector<T> scaled(block * s.dim), probs(kRoundsProbs ? block * s.tk : 0);
  std::vector<T> k_head(s.tk * s.dim), v_head(s.tk * s.dim);
  std::vector<float> logits(block * s.tk), out(block * s.dim), sums(block);
  for (int64_t g = lo; g < lo + len; ++g) {
    const int64_t b = g / s.heads, h = g % s.heads;
    const auto head_bias = [&](int64_t col) {
      return bias == nullptr ? nullptr : bias + col + h * s.dim;
    };
    for (int64_t t = 0; t < s.tk; ++t) {  // this head's k and v, contiguous, the bias added
      const int64_t row = b * s.tk + t;
      Map(k + row * s.ck + s.k_col + h * s.dim, s.dim, k_head.data() + t * s.dim, kSame,
          head_bias(s.k_col));
      Map(v + row * s.cv + s.v_col + h * s.dim, s.dim, v_head.data() + t * s.dim, kSame,
          head_bias(s.v_col));
    }
    for (int64_t r0 = 0; r0 < s.tq; r0 += block) {
      const int64_t rows = std::min(block, s.tq - r0);
      for (int64_t i = 0; i < rows; ++i) {  // q * scale, rounded to T as XLA rounds it
        const T* q_row = q + (b * s.tq + r0 + i) * s.cq + s.q_col + h * s.dim;
        Map(q_row, s.dim, scaled.data() + i * s.dim,
            [=](Floats x) { return RoundTo<T>(x * scale); }, head_bias(s.q_col));
      }
      gemm(kRowMajor, kNoTrans, kTrans, rows, s.tk, s.dim, 1.0f, scaled.data(), s.dim,
           k_head.data(), s.dim, 0.0f, logits.data(), s.tk);
      ExpRows(logits.data(), rows, s.tk, sums.data());
      const T* p;
      if constexpr (kRoundsProbs) {
        Map(logits.data(), rows * s.tk, probs.data(), kSame);
        p = probs.data();
      } else {
        p = logits.data();
      }
      gemm(kRowMajor, kNoTrans, kNoTrans, rows, s.dim, s.tk, 1.0f, p, s.tk, v_head.data(), s.dim,
           0.0f, out.data(), s.dim);
      for (int64_t i = 0; i < rows; ++i) {
        T* y_row = y + ((b * s.tq + r0 + i) * s.heads + h) * s.dim;
        const float sum = sums[i];
        Map(out.data() + i * s.dim, s.dim, y_row, [=](Floats x) { return x / sum; });
      }
    }
  }
}

// AttendPairs compiled for each ISA, for float32 and for bfloat16 q, k, v.
VIT_CLONES void AttendF32(GemmFn<float> gemm, const Shape& s, float scale, const float* q,
                          const float* k, const float* v, const float* bias, float* y,
                          int64_t lo, int64_t len) {
  AttendPairs<float>(gemm, s, scale, q, k, v, bias, y, lo, len);
}
VIT_CLONES void AttendBf16(GemmFn<Bf16> gemm, const Shape& s, float scale, const Bf16* q,
                           const Bf16* k, const Bf16* v, const Bf16* bias, Bf16* y, int64_t lo,
                           int64_t len) {
  AttendPairs<Bf16>(gemm, s, scale, q, k, v, bias, y, lo, len);
}

ffi::Future Attention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                      ffi::AnyBuffer v, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                      int64_t heads, int64_t head_dim, int64_t q_col, int64_t k_col,
                      int64_t v_col, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), yd = y->dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || yd.size() != 4) {
    return Ready(ffi::Error::InvalidArgument(
        "vit blas_attention takes q, k, v [B, T, C] and returns [B, Tq, heads, head_dim]"));
  }
  Shape s{qd[0], qd[1], kd[1], heads, head_dim, qd[2], kd[2], vd[2], q_col, k_col, v_col};
  const int64_t span = heads * head_dim;
  if (kd[0] != s.batch || vd[0] != s.batch || vd[1] != s.tk || heads < 1 || head_dim < 1 ||
      q_col < 0 || k_col < 0 || v_col < 0 || q_col + span > s.cq || k_col + span > s.ck ||
      v_col + span > s.cv || yd[0] != s.batch || yd[1] != s.tq || yd[2] != heads ||
      yd[3] != head_dim) {
    return Ready(ffi::Error::InvalidArgument(
        "vit blas_attention: q, k, v and the output do not agree in batch, tokens and heads"));
  }
  const ffi::DataType dtype = q.element_type();
  if (k.element_type() != dtype || v.element_type() != dtype || y->element_type() != dtype ||
      bias.element_type() != dtype ||
      (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16)) {
    return Ready(ffi::Error::InvalidArgument(
        "vit blas_attention takes float32 or bfloat16 q, k, v, bias and output, all one dtype"));
  }
  const bool biased = bias.element_count() > 0;
  if (biased && (bias.dimensions().size() != 1 || bias.dimensions()[0] != s.cq ||
                 s.ck != s.cq || s.cv != s.cq)) {
    return Ready(ffi::Error::InvalidArgument(
        "vit blas_attention: a bias takes q, k and v in one array and has its columns"));
  }
  if (s.batch == 0 || s.tq == 0 || s.tk == 0) {
    return Ready();
  }
  const double flops = 4.0 * s.batch * heads * s.tq * s.tk * head_dim;
  const auto run = [&](auto attend, auto gemm, auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    const T* qp = static_cast<const T*>(q.untyped_data());
    const T* kp = static_cast<const T*>(k.untyped_data());
    const T* vp = static_cast<const T*>(v.untyped_data());
    const T* bp = biased ? static_cast<const T*>(bias.untyped_data()) : nullptr;
    T* yp = static_cast<T*>(y->untyped_data());
    return InSlabs(pool, s.batch * heads, 1, flops, [=](int64_t lo, int64_t len) {
      attend(gemm, s, scale, qp, kp, vp, bp, yp, lo, len);
    });
  };
  if (dtype == ffi::DataType::F32) {
    if (g_sgemm == nullptr) {
      return Ready(ffi::Error::Internal("vit blas_attention: no cblas_sgemm handed over yet"));
    }
    return run(AttendF32, g_sgemm, static_cast<float*>(nullptr));
  }
  if (g_bf16_gemm == nullptr) {
    return Ready(ffi::Error::Internal(
        "vit blas_attention: the BLAS handed over has no cblas_gemm_bf16bf16f32"));
  }
  return run(AttendBf16, g_bf16_gemm, static_cast<Bf16*>(nullptr));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitBlasAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("head_dim")
                                  .Attr<int64_t>("q_col")
                                  .Attr<int64_t>("k_col")
                                  .Attr<int64_t>("v_col")
                                  .Attr<float>("scale"));
