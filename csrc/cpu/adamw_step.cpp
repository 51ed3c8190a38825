// CPU twin of csrc/cuda/adamw_step.cu: the same per-element function (adamw_step.h) in an
// OpenMP loop (serial when the build found no OpenMP).
#include "adamw_step.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace lowrank_fused {

namespace {

template <typename TW, typename TG, typename TS>
void adamw_loop(const AdamWArgs& a, int num_threads) {
  TW* w = static_cast<TW*>(a.w);
  const TG* g = static_cast<const TG*>(a.g);
  TS* m = static_cast<TS*>(a.m);
  TS* v = static_cast<TS*>(a.v);
  const AdamWScalars s = a.s;
  const int64_t n = a.n;
#if defined(_OPENMP)
  // below this many elements a parallel region costs more than it saves
  constexpr int64_t kGrain = 1 << 15;
  int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  const int64_t useful = (n + kGrain - 1) / kGrain;
  if (useful < threads) threads = static_cast<int>(useful < 1 ? 1 : useful);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t i = 0; i < n; ++i) adamw_element(w + i, g + i, m + i, v + i, s);
#else
  (void)num_threads;
  for (int64_t i = 0; i < n; ++i) adamw_element(w + i, g + i, m + i, v + i, s);
#endif
}

}  // namespace

void adamw_step_cpu(const AdamWArgs& a, int num_threads) {
  check_args(a);
  if (a.n == 0) return;
  dispatch_dtypes(a.w_dtype, a.g_dtype, a.mv_dtype, [&](auto tw, auto tg, auto ts) {
    adamw_loop<decltype(tw), decltype(tg), decltype(ts)>(a, num_threads);
  });
}

}  // namespace lowrank_fused
