// Softmax attention in asynchronous jax.ffi custom calls for XLA:CPU (vit/blas_gemm.py builds them
// with vit/blas_gemm.cc): VitBlasAttention, the forward pass, and VitBlasAttentionGrad, its
// gradient.
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
// the operands' dtype; under a gradient the call also writes the weights (exponentials / sums,
// float32 [B, heads, Tq, Tk]) for VitBlasAttentionGrad, which takes them, self-attention's fused
// projection and bias as the forward read them, and the output's gradient dy [B, T, heads,
// head_dim], and writes the projection's gradient [B, T, 3 * heads * head_dim]: dq, dk, dv side by
// side, in `_attend_bwd`'s formulas. Work is one slab of (batch, head) pairs per thread of XLA's
// pool.
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
      tops = Select(x > tops, x, tops);
    }
    float top = tops[0];
    for (int l = 1; l < kLanes; ++l) {
      top = tops[l] > top ? tops[l] : top;
    }
    Floats lanes = {};
    int64_t j = 0;
    for (; j + kLanes <= cols; j += kLanes) {
      const Floats e = Exp(Load(row + j, kLanes) - top);
      StoreLanes(row + j, e);
      lanes += e;
    }
    if (j < cols) {
      const Floats e = Exp(Load(row + j, cols - j, top) - top);
      for (int64_t l = 0; l < cols - j; ++l) {
        row[j + l] = e[l];
        lanes.Set(l, lanes[l] + e[l]);
      }
    }
    sums[i] = Sum(lanes);
  }
}

struct Shape {
  int64_t batch = 0, tq = 0, tk = 0, heads = 0, dim = 0, cq = 0, ck = 0, cv = 0;
  int64_t q_col = 0, k_col = 0, v_col = 0;
};

// One (batch, head) pair's q, k, v as the BLAS reads them: the head's k and v rows contiguous,
// a block of its queries times `scale`, each with the bias added and rounded to T as XLA's add
// and multiply round them.
template <typename T>
struct Head {
  const Shape& s;
  const T *q, *k, *v, *bias;  // bias: null, or with q's columns (k's and v's at k_col, v_col)
  std::vector<T> k_rows, v_rows, scaled;

  Head(const Shape& shape, const T* q, const T* k, const T* v, const T* bias, int64_t block)
      : s(shape), q(q), k(k), v(v), bias(bias), k_rows(s.tk * s.dim), v_rows(s.tk * s.dim),
        scaled(block * s.dim) {}

  const T* BiasAt(int64_t col, int64_t h) const {
    return bias == nullptr ? nullptr : bias + col + h * s.dim;
  }
  // k_rows and v_rows of pair (b, h).
  void ReadKeys(int64_t b, int64_t h) {
    for (int64_t t = 0; t < s.tk; ++t) {
      const int64_t row = b * s.tk + t;
      Map(k + row * s.ck + s.k_col + h * s.dim, s.dim, k_rows.data() + t * s.dim, kSame,
          BiasAt(s.k_col, h));
      Map(v + row * s.cv + s.v_col + h * s.dim, s.dim, v_rows.data() + t * s.dim, kSame,
          BiasAt(s.v_col, h));
    }
  }
  // `scaled` = q * scale of pair (b, h)'s queries [r0, r0 + rows).
  void ReadQueries(int64_t b, int64_t h, int64_t r0, int64_t rows, float scale) {
    for (int64_t i = 0; i < rows; ++i) {
      const T* q_row = q + (b * s.tq + r0 + i) * s.cq + s.q_col + h * s.dim;
      Map(q_row, s.dim, scaled.data() + i * s.dim,
          [=](Floats x) { return RoundTo<T>(x * scale); }, BiasAt(s.q_col, h));
    }
  }
};

// The queries in a block: its logits at most kBlockFloats.
inline int64_t QueryBlock(const Shape& s) {
  return std::clamp<int64_t>(kBlockFloats / std::max<int64_t>(s.tk, 1), 1, s.tq);
}

// The attention of pairs [lo, lo + len) of (batch, head) = (g / heads, g % heads) on T (float
// or Bf16) q, k, v (and `bias`, see Head) into y; with `weights` (else null), the weights too.
template <typename T>
VIT_INLINE void AttendPairs(GemmFn<T> gemm, const Shape& s, float scale, const T* q,
                            const T* k, const T* v, const T* bias, T* y, float* weights,
                            int64_t lo, int64_t len) {
  constexpr bool kRoundsProbs = !std::is_same_v<T, float>;  // bfloat16 exponentials
  const int64_t block = QueryBlock(s);
  Head<T> head(s, q, k, v, bias, block);
  std::vector<T> probs(kRoundsProbs ? block * s.tk : 0);
  std::vector<float> logits(block * s.tk), out(block * s.dim), sums(block);
  for (int64_t g = lo; g < lo + len; ++g) {
    const int64_t b = g / s.heads, h = g % s.heads;
    head.ReadKeys(b, h);
    for (int64_t r0 = 0; r0 < s.tq; r0 += block) {
      const int64_t rows = std::min(block, s.tq - r0);
      head.ReadQueries(b, h, r0, rows, scale);
      gemm(kRowMajor, kNoTrans, kTrans, rows, s.tk, s.dim, 1.0f, head.scaled.data(), s.dim,
           head.k_rows.data(), s.dim, 0.0f, logits.data(), s.tk);
      ExpRows(logits.data(), rows, s.tk, sums.data());
      if (weights != nullptr) {
        float* w = weights + (g * s.tq + r0) * s.tk;
        for (int64_t i = 0; i < rows; ++i) {
          const float sum = sums[i];
          Map(logits.data() + i * s.tk, s.tk, w + i * s.tk, [=](Floats x) { return x / sum; });
        }
      }
      const T* p;
      if constexpr (kRoundsProbs) {
        Map(logits.data(), rows * s.tk, probs.data(), kSame);
        p = probs.data();
      } else {
        p = logits.data();
      }
      gemm(kRowMajor, kNoTrans, kNoTrans, rows, s.dim, s.tk, 1.0f, p, s.tk, head.v_rows.data(),
           s.dim, 0.0f, out.data(), s.dim);
      for (int64_t i = 0; i < rows; ++i) {
        T* y_row = y + ((b * s.tq + r0 + i) * s.heads + h) * s.dim;
        const float sum = sums[i];
        Map(out.data() + i * s.dim, s.dim, y_row, [=](Floats x) { return x / sum; });
      }
    }
  }
}

// Each of `rows` rows of the weights' gradient d (row stride `cols`) becomes the logits'
// gradient w * (d - sum(d * w)), in place, w the weights (same stride).
VIT_INLINE void SoftmaxGradRows(const float* w, float* d, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* w_row = w + i * cols;
    float* d_row = d + i * cols;
    Floats lanes = {};
    for (int64_t j = 0; j < cols; j += kLanes) {
      lanes += Load(w_row + j, cols - j) * Load(d_row + j, cols - j);
    }
    const float dot = Sum(lanes);
    for (int64_t j = 0; j < cols; j += kLanes) {
      const int64_t n = std::min<int64_t>(kLanes, cols - j);
      Store(d_row + j, Load(w_row + j, n) * (Load(d_row + j, n) - dot), n);
    }
  }
}

// The gradient of pairs [lo, lo + len) of self-attention (q, k, v all read from `qkv`, Shape's
// columns, with `bias`) from dy [B, T, heads, dim] and the forward's `weights`, into
// d_qkv [B, T, cq] at the same columns.
template <typename T>
VIT_INLINE void AttendGradPairs(GemmFn<T> gemm, const Shape& s, float scale, const T* qkv,
                                const T* bias, const T* dy, const float* weights, T* d_qkv,
                                int64_t lo, int64_t len) {
  constexpr bool kRounds = !std::is_same_v<T, float>;  // bfloat16 operands for the products
  const int64_t block = QueryBlock(s), dy_ld = s.heads * s.dim;
  Head<T> head(s, qkv, qkv, qkv, bias, block);
  std::vector<T> rounded(kRounds ? block * s.tk : 0);
  std::vector<float> d_logits(block * s.tk), dq(block * s.dim), dk(s.tk * s.dim),
      dv(s.tk * s.dim);
  // the float32 rows `from` as the products' operand: themselves, or rounded to bfloat16
  const auto operand = [&](const float* from, int64_t n) -> const T* {
    if constexpr (kRounds) {
      Map(from, n, rounded.data(), kSame);
      return rounded.data();
    } else {
      return from;
    }
  };
  for (int64_t g = lo; g < lo + len; ++g) {
    const int64_t b = g / s.heads, h = g % s.heads;
    head.ReadKeys(b, h);
    for (int64_t r0 = 0; r0 < s.tq; r0 += block) {
      const int64_t rows = std::min(block, s.tq - r0);
      const float beta = r0 == 0 ? 0.0f : 1.0f;  // dk and dv sum over the blocks of queries
      const float* w = weights + (g * s.tq + r0) * s.tk;
      const T* dy_rows = dy + ((b * s.tq + r0) * s.heads + h) * s.dim;
      gemm(kRowMajor, kNoTrans, kTrans, rows, s.tk, s.dim, 1.0f, dy_rows,
           dy_ld, head.v_rows.data(), s.dim, 0.0f, d_logits.data(), s.tk);
      gemm(kRowMajor, kTrans, kNoTrans, s.tk, s.dim, rows, 1.0f, operand(w, rows * s.tk), s.tk,
           dy_rows, dy_ld, beta, dv.data(), s.dim);
      SoftmaxGradRows(w, d_logits.data(), rows, s.tk);
      const T* d_op = operand(d_logits.data(), rows * s.tk);
      gemm(kRowMajor, kNoTrans, kNoTrans, rows, s.dim, s.tk, 1.0f, d_op, s.tk,
           head.k_rows.data(), s.dim, 0.0f, dq.data(), s.dim);
      head.ReadQueries(b, h, r0, rows, scale);
      gemm(kRowMajor, kTrans, kNoTrans, s.tk, s.dim, rows, 1.0f, d_op, s.tk,
           head.scaled.data(), s.dim, beta, dk.data(), s.dim);
      for (int64_t i = 0; i < rows; ++i) {
        T* row = d_qkv + (b * s.tq + r0 + i) * s.cq + s.q_col + h * s.dim;
        Map(dq.data() + i * s.dim, s.dim, row, [=](Floats x) { return x * scale; });
      }
    }
    for (int64_t t = 0; t < s.tk; ++t) {
      T* row = d_qkv + (b * s.tk + t) * s.cq + h * s.dim;
      Map(dk.data() + t * s.dim, s.dim, row + s.k_col, kSame);
      Map(dv.data() + t * s.dim, s.dim, row + s.v_col, kSame);
    }
  }
}

// AttendPairs and AttendGradPairs for float32 and for bfloat16 q, k, v.
void AttendF32(GemmFn<float> gemm, const Shape& s, float scale, const float* q,
               const float* k, const float* v, const float* bias, float* y,
               float* weights, int64_t lo, int64_t len) {
  AttendPairs<float>(gemm, s, scale, q, k, v, bias, y, weights, lo, len);
}
void AttendBf16(GemmFn<Bf16> gemm, const Shape& s, float scale, const Bf16* q,
                const Bf16* k, const Bf16* v, const Bf16* bias, Bf16* y,
                float* weights, int64_t lo, int64_t len) {
  AttendPairs<Bf16>(gemm, s, scale, q, k, v, bias, y, weights, lo, len);
}
void AttendGradF32(GemmFn<float> gemm, const Shape& s, float scale, const float* qkv,
                   const float* bias, const float* dy, const float* weights,
                   float* d_qkv, int64_t lo, int64_t len) {
  AttendGradPairs<float>(gemm, s, scale, qkv, bias, dy, weights, d_qkv, lo, len);
}
void AttendGradBf16(GemmFn<Bf16> gemm, const Shape& s, float scale, const Bf16* qkv,
                    const Bf16* bias, const Bf16* dy, const float* weights,
                    Bf16* d_qkv, int64_t lo, int64_t len) {
  AttendGradPairs<Bf16>(gemm, s, scale, qkv, bias, dy, weights, d_qkv, lo, len);
}

// True if `weights` is empty or float32 [B, heads, Tq, Tk] of s.
bool WeightsFit(const ffi::AnyBuffer& weights, const Shape& s) {
  if (weights.element_count() == 0) {
    return true;
  }
  const auto d = weights.dimensions();
  return weights.element_type() == ffi::DataType::F32 && d.size() == 4 && d[0] == s.batch &&
         d[1] == s.heads && d[2] == s.tq && d[3] == s.tk;
}

ffi::Future Attention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                      ffi::AnyBuffer v, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                      ffi::Result<ffi::AnyBuffer> weights, int64_t heads, int64_t head_dim,
                      int64_t q_col, int64_t k_col, int64_t v_col, float scale) {
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
      yd[3] != head_dim || !WeightsFit(*weights, s)) {
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
  float* wp = weights->element_count() > 0 ? static_cast<float*>(weights->untyped_data())
                                           : nullptr;
  const auto run = [&](auto attend, auto gemm, auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    const T* qp = static_cast<const T*>(q.untyped_data());
    const T* kp = static_cast<const T*>(k.untyped_data());
    const T* vp = static_cast<const T*>(v.untyped_data());
    const T* bp = biased ? static_cast<const T*>(bias.untyped_data()) : nullptr;
    T* yp = static_cast<T*>(y->untyped_data());
    return InSlabs(pool, s.batch * heads, 1, flops, [=](int64_t lo, int64_t len) {
      attend(gemm, s, scale, qp, kp, vp, bp, yp, wp, lo, len);
    });
  };
  return ForDtypeWithGemm(dtype, "vit blas_attention", run, AttendF32, AttendBf16);
}

ffi::Future AttentionGrad(ffi::ThreadPool pool, ffi::AnyBuffer qkv, ffi::AnyBuffer bias,
                          ffi::AnyBuffer dy, ffi::AnyBuffer weights,
                          ffi::Result<ffi::AnyBuffer> d_qkv, int64_t heads, int64_t head_dim,
                          float scale) {
  const auto xd = qkv.dimensions(), dd = dy.dimensions();
  const int64_t span = heads * head_dim;
  if (xd.size() != 3 || dd.size() != 4 || heads < 1 || head_dim < 1 || xd[2] != 3 * span ||
      dd[0] != xd[0] || dd[1] != xd[1] || dd[2] != heads || dd[3] != head_dim ||
      d_qkv->dimensions().size() != 3 || d_qkv->element_count() != qkv.element_count()) {
    return Ready(ffi::Error::InvalidArgument(
        "vit blas_attention_grad takes q, k, v [B, T, 3 * heads * head_dim] and dy [B, T, heads, "
        "head_dim]"));
  }
  Shape s{xd[0], xd[1], xd[1], heads, head_dim, xd[2], xd[2], xd[2], 0, span, 2 * span};
  const ffi::DataType dtype = qkv.element_type();
  if (dy.element_type() != dtype || d_qkv->element_type() != dtype ||
      bias.element_type() != dtype || bias.element_count() != xd[2] ||
      weights.element_count() == 0 || !WeightsFit(weights, s) ||
      (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16)) {
    return Ready(ffi::Error::InvalidArgument(
        "vit blas_attention_grad takes float32 or bfloat16 q, k, v, bias [3 * heads * head_dim] "
        "and dy, and the forward's float32 weights [B, heads, T, T]"));
  }
  if (s.batch == 0 || s.tq == 0) {
    return Ready();
  }
  const double flops = 8.0 * s.batch * heads * s.tq * s.tk * head_dim;
  const float* wp = static_cast<const float*>(weights.untyped_data());
  const auto run = [&](auto attend_grad, auto gemm, auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    const T* xp = static_cast<const T*>(qkv.untyped_data());
    const T* bp = static_cast<const T*>(bias.untyped_data());
    const T* dyp = static_cast<const T*>(dy.untyped_data());
    T* dp = static_cast<T*>(d_qkv->untyped_data());
    return InSlabs(pool, s.batch * heads, 1, flops, [=](int64_t lo, int64_t len) {
      attend_grad(gemm, s, scale, xp, bp, dyp, wp, dp, lo, len);
    });
  };
  return ForDtypeWithGemm(dtype, "vit blas_attention_grad", run, AttendGradF32, AttendGradBf16);
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
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("head_dim")
                                  .Attr<int64_t>("q_col")
                                  .Attr<int64_t>("k_col")
                                  .Attr<int64_t>("v_col")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitBlasAttentionGrad, AttentionGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("head_dim")
                                  .Attr<float>("scale"));
