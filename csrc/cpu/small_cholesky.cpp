// CPU twin of csrc/cuda/small_cholesky.cu: the shared per-matrix routine (small_cholesky.h),
// matrices of the batch in an OpenMP loop.
#include "small_cholesky.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace lowrank_fused {

void small_cholesky_inverse_cpu(const SmallCholeskyArgs& a, int num_threads) {
  check_small_cholesky_args(a);
  const int64_t kk = a.k * a.k;
#if defined(_OPENMP)
  int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  if (a.batch < threads) threads = static_cast<int>(a.batch < 1 ? 1 : a.batch);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && kk >= 64)
  for (int64_t b = 0; b < a.batch; ++b)
    a.ok[b] = small_cholesky_inverse_one(a.gram + b * kk, a.linv + b * kk, a.k,
                                         a.pivot_ratio_tol);
#else
  (void)num_threads;
  for (int64_t b = 0; b < a.batch; ++b)
    a.ok[b] = small_cholesky_inverse_one(a.gram + b * kk, a.linv + b * kk, a.k,
                                         a.pivot_ratio_tol);
#endif
}

}  // namespace lowrank_fused
