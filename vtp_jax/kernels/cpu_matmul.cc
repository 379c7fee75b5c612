// A float32 matrix product for XLA:CPU as one FFI handler, built by cpu_build.py and used by
// cpu_dense.py (precision.dense='cpu') for the transformer blocks' linear layers.
//
// Why it exists: at the blocks' shapes (a few thousand tokens x 384-1536 features) XLA:CPU's own
// matmuls reach 20-30% less than one BLAS call on the same 2-core machine
// (docs/benchmarks.md, 'CPU kernels').
// Row-major C (m x n) = op(A) op(B), where op transposes when asked: the forward is A B, the two
// gradients are dC B^T and A^T dC, so one handler serves the layer's forward and backward.
//
// The output is cut into as many blocks (of rows, or of columns when there are more columns) as
// XLA's intra-op pool has threads, and each block is one single-threaded sgemm (cpu_blas.h).

#include <algorithm>
#include <cstdint>

#include "cpu_blas.h"

namespace {

using namespace vtp_cpu;  // NOLINT: the shared BLAS and thread-pool helpers

// Blocks start on multiples of 16 rows or columns, so that BLAS's packed panels stay whole.
constexpr int64_t kBlockAlign = 16;

using Matrix = ffi::Buffer<ffi::F32, 2>;  // a named alias: the binding macro splits on commas

ffi::Error Matmul(ffi::ThreadPool pool, Matrix a, Matrix b, ffi::Result<Matrix> c,
                  bool transpose_a, bool transpose_b) {
  const auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  const int64_t m = transpose_a ? ad[1] : ad[0], k = transpose_a ? ad[0] : ad[1];
  const int64_t n = transpose_b ? bd[0] : bd[1];
  if ((transpose_b ? bd[1] : bd[0]) != k || cd[0] != m || cd[1] != n)
    return ffi::Error::InvalidArgument("vtp_matmul: op(A), op(B) and C shapes do not chain");
  if (g_sgemm.load() == nullptr)
    return ffi::Error::Internal("vtp_matmul: sgemm was not set (cpu_build.py's load())");
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::fill_n(c->typed_data(), m * n, 0.0f);
    return ffi::Error::Success();
  }
  const float* a_data = a.typed_data();
  const float* b_data = b.typed_data();
  float* c_data = c->typed_data();
  const int lda = ad[1], ldb = bd[1], ldc = n;
  // Column-major, C^T (n x m) = op(B)^T op(A)^T: BLAS's "A" is our B and its "B" is our A.
  const char op_a = transpose_a ? 'T' : 'N', op_b = transpose_b ? 'T' : 'N';
  const bool split_rows = m >= n;
  const int64_t extent = split_rows ? m : n;
  const int64_t pieces_wanted = std::max<int64_t>(1, pool.num_threads());
  const int64_t block =
      ((extent + pieces_wanted - 1) / pieces_wanted + kBlockAlign - 1) / kBlockAlign * kBlockAlign;
  const int64_t pieces = (extent + block - 1) / block;
  ParallelFor(pool, pieces, [=](int64_t i) {
    SingleThreadedBlas single_threaded;
    const int64_t start = i * block, size = std::min(block, extent - start);
    if (split_rows) {  // rows [start, start + size) of C, from the same rows of op(A)
      const float* a_rows = transpose_a ? a_data + start : a_data + start * lda;
      Gemm(op_b, op_a, n, size, k, 1.0f, b_data, ldb, a_rows, lda, 0.0f, c_data + start * ldc,
           ldc);
    } else {  // columns [start, start + size) of C, from the same columns of op(B)
      const float* b_cols = transpose_b ? b_data + start * ldb : b_data + start;
      Gemm(op_b, op_a, size, m, k, 1.0f, b_cols, ldb, a_data, lda, 0.0f, c_data + start, ldc);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VtpMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Ret<Matrix>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
