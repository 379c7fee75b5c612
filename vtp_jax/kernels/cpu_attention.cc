// Softmax attention for XLA:CPU as two FFI handlers (forward, backward), built by cpu_build.py.
//
// Why it exists: XLA:CPU has no fused attention; its batched (tokens x 64 x tokens) matmuls run at
// 18-30 GFLOP/s on small CPUs, about half of what one BLAS call per (batch, head) slice reaches.
// Here each slice is computed with BLAS sgemm and a fused row softmax, and the slices are spread
// over XLA's own intra-op thread pool, one single-threaded BLAS call at a time per thread
// (cpu_blas.h).
//
// Layout: heads-first, row-major (..., tokens, head_dim) float32, as kernels/xla_attention.py. The
// forward returns the output and the probabilities P (saved for the backward, as attention.py
// does). Every product below is written for BLAS's column-major view of the row-major arrays.

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_blas.h"

namespace {

using namespace vtp_cpu;  // NOLINT: the shared BLAS and thread-pool helpers

// exp(x) for x <= 0 (softmax arguments after the row max is subtracted), written branch-free so
// that the compiler vectorises the row loops. Cody-Waite range reduction and a degree-6
// polynomial: at most 3 ulp from the correctly rounded exp (checked on every 7th float32 in
// [-87.3, 0]). Arguments below -87.3 (where float32 exp leaves the normal range) give 0, so masked
// scores (float32 min) get probability exactly 0.
inline float ExpNonPositive(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693145751953125f;
  const float kLn2Lo = 1.42860682030941723212e-6f;
  const bool underflow = x < -87.3f;
  x = underflow ? 0.0f : x;
  const float n = std::nearbyint(x * kLog2e);
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;  // |r| <= ln(2)/2
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return underflow ? 0.0f : p * two_n;
}

// Per-thread scratch, reused across calls: a (tokens x tokens) buffer freshly allocated for every
// slice would be mmap'ed and page-faulted each time.
float* Scratch(size_t size) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < size) buffer.resize(size);
  return buffer.data();
}

struct Dims {
  int64_t slices, q_len, k_len, head_dim;
};

ffi::Error CheckDims(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                     const ffi::Buffer<ffi::F32>& v, Dims& d) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() < 2 || kd.size() != qd.size() || vd.size() != qd.size())
    return ffi::Error::InvalidArgument("q, k, v must have the same rank, at least 2");
  d = Dims{1, qd[qd.size() - 2], kd[kd.size() - 2], qd.back()};
  for (size_t i = 0; i + 2 < qd.size(); ++i) {
    if (kd[i] != qd[i] || vd[i] != qd[i])
      return ffi::Error::InvalidArgument("q, k, v leading (batch, heads) dims differ");
    d.slices *= qd[i];
  }
  if (kd.back() != d.head_dim || vd.back() != d.head_dim || vd[vd.size() - 2] != d.k_len)
    return ffi::Error::InvalidArgument("k and v must be (..., keys, head_dim) like q");
  if (g_sgemm.load() == nullptr)
    return ffi::Error::Internal("vtp_attention: sgemm was not set (cpu_build.py's load())");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> probs, bool causal) {
  Dims d;
  if (ffi::Error error = CheckDims(q, k, v, d); error.failure()) return error;
  const int tq = d.q_len, tk = d.k_len, hd = d.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const float* q_all = q.typed_data();
  const float* k_all = k.typed_data();
  const float* v_all = v.typed_data();
  float* o_all = out->typed_data();
  float* p_all = probs->typed_data();
  ParallelFor(pool, d.slices, [=](int64_t i) {
    SingleThreadedBlas single_threaded;
    const float* qs = q_all + i * tq * hd;
    const float* ks = k_all + i * tk * hd;
    const float* vs = v_all + i * tk * hd;
    float* p = p_all + i * tq * tk;
    // P^T (keys x queries, column-major) = K Q^T: row-major P (queries x keys) = scale Q K^T.
    Gemm('T', 'N', tk, tq, hd, scale, ks, hd, qs, hd, 0.0f, p, tk);
    for (int r = 0; r < tq; ++r) {
      float* row = p + static_cast<int64_t>(r) * tk;
      // Causal: key c is visible to query r when c <= r (queries and keys aligned at the start).
      const int visible = causal ? std::min(r + 1, tk) : tk;
      float row_max = -std::numeric_limits<float>::infinity();
      for (int c = 0; c < visible; ++c) row_max = std::max(row_max, row[c]);
      float total = 0.0f;
      for (int c = 0; c < visible; ++c) {
        row[c] = ExpNonPositive(row[c] - row_max);
        total += row[c];
      }
      const float inverse = 1.0f / total;
      for (int c = 0; c < visible; ++c) row[c] *= inverse;
      for (int c = visible; c < tk; ++c) row[c] = 0.0f;
    }
    // O^T (head_dim x queries) = V^T P^T: row-major O = P V.
    Gemm('N', 'N', hd, tq, tk, 1.0f, vs, hd, p, tk, 0.0f, o_all + i * tq * hd, hd);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> probs, ffi::Buffer<ffi::F32> d_out,
                    ffi::ResultBuffer<ffi::F32> d_q, ffi::ResultBuffer<ffi::F32> d_k,
                    ffi::ResultBuffer<ffi::F32> d_v) {
  Dims d;
  if (ffi::Error error = CheckDims(q, k, v, d); error.failure()) return error;
  const int tq = d.q_len, tk = d.k_len, hd = d.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const float* q_all = q.typed_data();
  const float* k_all = k.typed_data();
  const float* v_all = v.typed_data();
  const float* o_all = out.typed_data();
  const float* p_all = probs.typed_data();
  const float* do_all = d_out.typed_data();
  float* dq_all = d_q->typed_data();
  float* dk_all = d_k->typed_data();
  float* dv_all = d_v->typed_data();
  ParallelFor(pool, d.slices, [=](int64_t i) {
    SingleThreadedBlas single_threaded;
    const float* qs = q_all + i * tq * hd;
    const float* ks = k_all + i * tk * hd;
    const float* vs = v_all + i * tk * hd;
    const float* os = o_all + i * tq * hd;
    const float* p = p_all + i * tq * tk;
    const float* dos = do_all + i * tq * hd;
    float* ds = Scratch(static_cast<size_t>(tq) * tk);
    // dV = P^T dO.
    Gemm('N', 'T', hd, tk, tq, 1.0f, dos, hd, p, tk, 0.0f, dv_all + i * tk * hd, hd);
    // dP = dO V^T, then dS = P * (dP - rowsum(dO * O)) * scale in place. rowsum(P * dP) equals
    // rowsum(dO * O) because O = P V (FlashAttention's identity), a reduction over head_dim only.
    Gemm('T', 'N', tk, tq, hd, 1.0f, vs, hd, dos, hd, 0.0f, ds, tk);
    for (int r = 0; r < tq; ++r) {
      float row_term = 0.0f;
      for (int h = 0; h < hd; ++h) row_term += dos[r * hd + h] * os[r * hd + h];
      float* ds_row = ds + static_cast<int64_t>(r) * tk;
      const float* p_row = p + static_cast<int64_t>(r) * tk;
      for (int c = 0; c < tk; ++c) ds_row[c] = p_row[c] * (ds_row[c] - row_term) * scale;
    }
    // dQ = dS K and dK = dS^T Q.
    Gemm('N', 'N', hd, tq, tk, 1.0f, ks, hd, ds, tk, 0.0f, dq_all + i * tq * hd, hd);
    Gemm('N', 'T', hd, tk, tq, 1.0f, qs, hd, ds, tk, 0.0f, dk_all + i * tk * hd, hd);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VtpAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(VtpAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
