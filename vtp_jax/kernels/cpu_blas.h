// What the compiled CPU kernels (cpu_attention.cc, cpu_matmul.cc) share: the BLAS sgemm that Python
// hands in (scipy's OpenBLAS, through cpu_blas.cc), one-thread BLAS per calling thread, and a loop
// over XLA's own intra-op thread pool. Built into one library by kernels/cpu_build.py.
//
// BLAS is column-major: a row-major (r x c) matrix is the column-major (c x r) one, so the
// kernels write every product for the transposes.

#ifndef VTP_JAX_MODELS_CPU_BLAS_H_
#define VTP_JAX_MODELS_CPU_BLAS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace vtp_cpu {

namespace ffi = xla::ffi;

// The reference BLAS sgemm signature, as scipy.linalg.cython_blas exports it.
using Sgemm = void (*)(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

// OpenBLAS's `int openblas_set_num_threads_local(int)` (0.3.27+), or null for other BLAS libraries.
using SetThreadsLocal = int (*)(int);

inline std::atomic<Sgemm> g_sgemm{nullptr};
inline std::atomic<SetThreadsLocal> g_set_threads_local{nullptr};

// Each piece of work runs its products on one thread: the pieces are already spread over XLA's
// threads, and OpenBLAS's own threads would oversubscribe the cores and, spinning after each call,
// slow XLA's next ops. Thread-local in OpenBLAS, so other callers in the process keep their
// setting.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : set_(g_set_threads_local.load(std::memory_order_relaxed)) {
    if (set_ != nullptr) previous_ = set_(1);
  }
  ~SingleThreadedBlas() {
    if (set_ != nullptr) set_(previous_);
  }

 private:
  SetThreadsLocal set_;
  int previous_ = 1;
};

// C (m x n, column-major) = alpha * op(A) op(B) + beta * C.
inline void Gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  g_sgemm.load(std::memory_order_relaxed)(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta,
                                          c, &ldc);
}

// Runs body(i) for i in [0, n) on the caller's thread and up to (pool threads - 1) helpers. The
// caller claims work too and only waits for items already taken, so a pool that runs tasks late,
// inline or one at a time cannot deadlock it. The shared state outlives helpers that start after
// the end.
template <typename Body>
inline void ParallelFor(ffi::ThreadPool& pool, int64_t n, Body body) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable all_done;
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, n, body]() {
    for (int64_t i = shared->next.fetch_add(1); i < n; i = shared->next.fetch_add(1)) {
      body(i);
      if (shared->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->all_done.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));  // a copy per task
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->all_done.wait(lock, [&] { return shared->done.load() == n; });
}

}  // namespace vtp_cpu

#endif  // VTP_JAX_MODELS_CPU_BLAS_H_
