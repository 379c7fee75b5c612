// The one entry point Python calls by hand (cpu_build.py's load()): it hands the kernels the BLAS
// they run on. Everything else in the library is reached through XLA's FFI.

#include "cpu_blas.h"

extern "C" void vtp_set_blas(void* sgemm, void* set_threads_local) {
  vtp_cpu::g_sgemm.store(reinterpret_cast<vtp_cpu::Sgemm>(sgemm));
  vtp_cpu::g_set_threads_local.store(reinterpret_cast<vtp_cpu::SetThreadsLocal>(set_threads_local));
}
