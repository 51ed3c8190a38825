// CPU twin of csrc/cuda/adamw_step.cu: the per-element function of adamw_step.h as a
// vectorised span (elementwise.h), one contiguous range per OpenMP thread (serial when the
// build found no OpenMP or the tensor is small).
#include "adamw_step.h"
#include "cpu/elementwise.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace lowrank_fused {

namespace {

// below this many elements per thread a parallel region costs more than it saves
constexpr int64_t kGrain = int64_t(1) << 15;
// thread ranges start on multiples of this many elements (whole cache lines for every dtype)
constexpr int64_t kAlign = 64;

void span(const AdamWArgs& a, int64_t begin, int64_t end) {
  if (end <= begin) return;
  cpu::adamw_span(cpu::offset(a.w, a.w_dtype, begin), cpu::offset(a.g, a.g_dtype, begin),
                  cpu::offset(a.m, a.mv_dtype, begin), cpu::offset(a.v, a.mv_dtype, begin),
                  end - begin, a.w_dtype, a.g_dtype, a.mv_dtype, a.s);
}

}  // namespace

void adamw_step_cpu(const AdamWArgs& a, int num_threads) {
  check_args(a);
  const int64_t n = a.n;
  if (n == 0) return;
  if (a.skip != nullptr && *a.skip != 0) return;  // host memory: reading it costs nothing
#if defined(_OPENMP)
  int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  const int64_t useful = (n + kGrain - 1) / kGrain;
  if (useful < threads) threads = static_cast<int>(useful < 1 ? 1 : useful);
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
      const int64_t per = ((n + T - 1) / T + kAlign - 1) / kAlign * kAlign;
      const int64_t begin = t * per;
      span(a, begin, begin + per < n ? begin + per : n);
    }
    return;
  }
#else
  (void)num_threads;
#endif
  span(a, 0, n);
}

}  // namespace lowrank_fused
