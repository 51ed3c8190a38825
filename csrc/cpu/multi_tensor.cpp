// CPU twins of csrc/cuda/multi_tensor.cu: one OpenMP loop over the (tensor, chunk) work items
// of every tensor (serial when the build found no OpenMP), the per-element math shared with
// the CUDA kernels (multi_tensor.h). Per-item partial results (sums of n^2 in double, the
// non-finite bit) are combined after the loop in item order, so the result does not depend on
// the number of threads.
#include "multi_tensor.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace lowrank_fused {

namespace {

constexpr int64_t kCpuChunk = int64_t(1) << 14;  // elements per work item
constexpr int64_t kGrain = int64_t(1) << 15;     // elements per thread worth a parallel region

int64_t total_elements(const std::vector<MTEntry>& entries) {
  int64_t total = 0;
  for (const MTEntry& e : entries) total += e.n;
  return total;
}

int thread_count(int64_t total, int num_threads) {
#if defined(_OPENMP)
  int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  const int64_t useful = (total + kGrain - 1) / kGrain;
  if (useful < threads) threads = static_cast<int>(useful < 1 ? 1 : useful);
  return threads;
#else
  (void)total;
  (void)num_threads;
  return 1;
#endif
}

// Runs body(item_index, item) for every item, in parallel when worth it.
template <typename F>
void for_items(const std::vector<MTItem>& items, int threads, F&& body) {
  const int64_t count = static_cast<int64_t>(items.size());
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t k = 0; k < count; ++k) body(k, items[k]);
#else
  (void)threads;
  for (int64_t k = 0; k < count; ++k) body(k, items[k]);
#endif
}

// All-fp32 fast paths: the same per-element functions on __restrict__ pointers, so the
// compiler may vectorise (IEEE vector mul/add/div/sqrt round exactly as the scalar ones; no
// contraction, no reassociation). The norm and the flag are separate passes over the stored N
// and R: eight fixed partial sums (deterministic) and an OR of exponent bits.
double sum_squares(const float* __restrict__ x, int64_t count) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += static_cast<double>(x[i + j]) * x[i + j];
  }
  for (; i < count; ++i) acc[0] += static_cast<double>(x[i]) * x[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

bool any_nonfinite(const float* __restrict__ x, int64_t count) {
  uint32_t worst = 0;
  for (int64_t i = 0; i < count; ++i) {
    uint32_t e = float_bits(x[i]) & 0x7f800000u;
    worst = e > worst ? e : worst;
  }
  return worst == 0x7f800000u;
}

void moments_fp32(const float* __restrict__ r, float* __restrict__ m, float* __restrict__ v,
                  float* __restrict__ n, int64_t count, const MomentsScalars s) {
  for (int64_t i = 0; i < count; ++i) {
    const float ri = r[i];
    const float mi = add_rn(mul_rn(m[i], s.beta1), mul_rn(s.one_minus_beta1, ri));
    const float vi = add_rn(mul_rn(v[i], s.beta2), mul_rn(s.one_minus_beta2, mul_rn(ri, ri)));
    m[i] = mi;
    v[i] = vi;
    n[i] = div_rn(div_rn(mi, s.c1), add_rn(sqrt_rn(div_rn(vi, s.c2)), s.eps));
  }
}

void adamw_fp32(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                float* __restrict__ v, int64_t count, const AdamWScalars s) {
  for (int64_t i = 0; i < count; ++i) adamw_element(w + i, g + i, m + i, v + i, s);
}

bool all_fp32(const MTEntry& e) {
  for (int b = 0; b < kMTMaxBuffers; ++b) {
    if (e.dtype[b] != kFloat32) return false;
  }
  return true;
}

}  // namespace

void adam_moments_multi_cpu(const MomentsMultiArgs& a, int num_threads) {
  check_moments_multi_args(a);
  const std::vector<MTItem> items = mt_work_items(a.entries, kCpuChunk);
  const bool want_norm = a.norms != nullptr, want_flag = a.flag != nullptr;
  std::vector<double> partial(want_norm ? items.size() : 0, 0.0);
  std::vector<unsigned char> bad(want_flag ? items.size() : 0, 0);
  const int threads = thread_count(total_elements(a.entries), num_threads);
  for_items(items, threads, [&](int64_t k, const MTItem& it) {
    const MTEntry& e = a.entries[it.tensor];
    const int64_t begin = int64_t(it.chunk) * kCpuChunk;
    const int64_t end = begin + kCpuChunk < e.n ? begin + kCpuChunk : e.n;
    double sq = 0.0;
    bool b = false;
    if (all_fp32(e)) {
      const float* r = static_cast<const float*>(e.ptr[0]) + begin;
      float* nn = static_cast<float*>(e.ptr[3]) + begin;
      moments_fp32(r, static_cast<float*>(e.ptr[1]) + begin,
                   static_cast<float*>(e.ptr[2]) + begin, nn, end - begin,
                   a.scalars[it.tensor]);
      if (want_norm) sq = sum_squares(nn, end - begin);
      if (want_flag) b = any_nonfinite(r, end - begin);
    } else {
      moments_range_any(e, a.scalars[it.tensor], begin, end, 1, want_norm, want_flag, sq, b);
    }
    if (want_norm) partial[k] = sq;
    if (want_flag) bad[k] = b ? 1 : 0;
  });
  if (want_norm) {
    std::vector<double> sums(a.entries.size(), 0.0);
    for (size_t k = 0; k < items.size(); ++k) sums[items[k].tensor] += partial[k];
    for (size_t t = 0; t < sums.size(); ++t) a.norms[t] = static_cast<float>(sums[t]);
  }
  if (want_flag) {
    for (unsigned char b : bad) {
      if (b) {
        *a.flag = 1;
        break;
      }
    }
  }
}

void adamw_step_multi_cpu(const AdamWMultiArgs& a, int num_threads) {
  check_adamw_multi_args(a);
  const std::vector<MTItem> items = mt_work_items(a.entries, kCpuChunk);
  const bool want_flag = a.flag != nullptr;
  std::vector<unsigned char> bad(want_flag ? items.size() : 0, 0);
  const int threads = thread_count(total_elements(a.entries), num_threads);
  for_items(items, threads, [&](int64_t k, const MTItem& it) {
    const MTEntry& e = a.entries[it.tensor];
    const int64_t begin = int64_t(it.chunk) * kCpuChunk;
    const int64_t end = begin + kCpuChunk < e.n ? begin + kCpuChunk : e.n;
    bool b = false;
    if (all_fp32(e)) {
      adamw_fp32(static_cast<float*>(e.ptr[0]) + begin,
                 static_cast<const float*>(e.ptr[1]) + begin,
                 static_cast<float*>(e.ptr[2]) + begin, static_cast<float*>(e.ptr[3]) + begin,
                 end - begin, a.scalars[it.tensor]);
      if (want_flag) b = any_nonfinite(static_cast<const float*>(e.ptr[1]) + begin, end - begin);
    } else {
      adamw_range_any(e, a.scalars[it.tensor], begin, end, 1, want_flag, b);
    }
    if (want_flag) bad[k] = b ? 1 : 0;
  });
  if (want_flag) {
    for (unsigned char b : bad) {
      if (b) {
        *a.flag = 1;
        break;
      }
    }
  }
}

}  // namespace lowrank_fused
