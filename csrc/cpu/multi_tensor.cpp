// CPU twins of csrc/cuda/multi_tensor.cu: one OpenMP loop over the (tensor, chunk) work items
// of every tensor (serial when the build found no OpenMP), each chunk one vectorised span of
// the per-element math shared with the CUDA kernels (elementwise.h, multi_tensor.h). Per-item
// partial results (sums of n^2 in double, the non-finite bit) are combined after the loop in
// item order, so the result does not depend on the number of threads (nor on the instruction
// set: elementwise.h).
#include "multi_tensor.h"
#include "cpu/elementwise.h"

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

// A skipped call (its skip flag, host memory, holds true): nothing but the non-finite flag is
// written, from a scan of the input buffer `buffer` (R or G) of every tensor.
void flag_skipped(const std::vector<MTEntry>& entries, int buffer, int32_t* flag,
                  int num_threads) {
  if (flag == nullptr) return;
  const std::vector<MTItem> items = mt_work_items(entries, kCpuChunk);
  std::vector<unsigned char> bad(items.size(), 0);
  const int threads = thread_count(total_elements(entries), num_threads);
  for_items(items, threads, [&](int64_t k, const MTItem& it) {
    const MTEntry& e = entries[it.tensor];
    const int64_t begin = int64_t(it.chunk) * kCpuChunk;
    const int64_t end = begin + kCpuChunk < e.n ? begin + kCpuChunk : e.n;
    bad[k] = cpu::any_nonfinite(cpu::offset(static_cast<const void*>(e.ptr[buffer]),
                                            e.dtype[buffer], begin),
                                e.dtype[buffer], end - begin) ? 1 : 0;
  });
  for (unsigned char b : bad) {
    if (b) {
      *flag = 1;
      break;
    }
  }
}

bool skipped(const uint8_t* skip) { return skip != nullptr && *skip != 0; }

bool all_fp32(const MTEntry& e) {
  for (int b = 0; b < kMTMaxBuffers; ++b) {
    if (e.dtype[b] != kFloat32) return false;
  }
  return true;
}

}  // namespace

void adam_moments_multi_cpu(const MomentsMultiArgs& a, int num_threads) {
  if (a.table != nullptr) {  // the scalars from the (host) table: the same call, resolved here
    MomentsMultiArgs b = a;
    const int64_t count = static_cast<int64_t>(a.entries.size());
    b.table = nullptr;
    b.scalars.clear();
    for (int64_t t = 0; t < count; ++t) b.scalars.push_back(moments_scalars_at(a.table, count, t));
    adam_moments_multi_cpu(b, num_threads);
    return;
  }
  check_moments_multi_args(a);
  if (skipped(a.skip)) {
    flag_skipped(a.entries, 0, a.flag, num_threads);
    return;
  }
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
      cpu::moments_span_fp32(r, static_cast<float*>(e.ptr[1]) + begin,
                             static_cast<float*>(e.ptr[2]) + begin, nn, end - begin,
                             a.scalars[it.tensor]);
      if (want_norm) sq = cpu::sum_squares_fp32(nn, end - begin);
      if (want_flag) b = cpu::any_nonfinite(r, kFloat32, end - begin);
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
  if (a.table != nullptr) {
    AdamWMultiArgs b = a;
    const int64_t count = static_cast<int64_t>(a.entries.size());
    b.table = nullptr;
    b.scalars.clear();
    for (int64_t t = 0; t < count; ++t) b.scalars.push_back(adamw_scalars_at(a.table, count, t));
    adamw_step_multi_cpu(b, num_threads);
    return;
  }
  check_adamw_multi_args(a);
  if (skipped(a.skip)) {
    flag_skipped(a.entries, 1, a.flag, num_threads);
    return;
  }
  const std::vector<MTItem> items = mt_work_items(a.entries, kCpuChunk);
  const bool want_flag = a.flag != nullptr;
  std::vector<unsigned char> bad(want_flag ? items.size() : 0, 0);
  const int threads = thread_count(total_elements(a.entries), num_threads);
  for_items(items, threads, [&](int64_t k, const MTItem& it) {
    const MTEntry& e = a.entries[it.tensor];
    const int64_t begin = int64_t(it.chunk) * kCpuChunk;
    const int64_t end = begin + kCpuChunk < e.n ? begin + kCpuChunk : e.n;
    const void* g = cpu::offset(static_cast<const void*>(e.ptr[1]), e.dtype[1], begin);
    cpu::adamw_span(cpu::offset(e.ptr[0], e.dtype[0], begin), g,
                    cpu::offset(e.ptr[2], e.dtype[2], begin),
                    cpu::offset(e.ptr[3], e.dtype[3], begin), end - begin, e.dtype[0],
                    e.dtype[1], e.dtype[2], a.scalars[it.tensor]);
    if (want_flag) bad[k] = cpu::any_nonfinite(g, e.dtype[1], end - begin) ? 1 : 0;
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

namespace {

// The non-finite bit of every (tensor, chunk) work item of the buffers (one OpenMP loop).
std::vector<unsigned char> nonfinite_items(const std::vector<const void*>& ptrs,
                                           const std::vector<int64_t>& sizes,
                                           const std::vector<int>& dtypes, int num_threads,
                                           std::vector<MTItem>& items) {
  std::vector<MTEntry> entries(ptrs.size());
  for (size_t t = 0; t < ptrs.size(); ++t) {
    entries[t].ptr[0] = const_cast<void*>(ptrs[t]);
    entries[t].n = sizes[t];
  }
  items = mt_work_items(entries, kCpuChunk);
  std::vector<unsigned char> bad(items.size(), 0);
  const int threads = thread_count(total_elements(entries), num_threads);
  for_items(items, threads, [&](int64_t k, const MTItem& it) {
    const int64_t begin = int64_t(it.chunk) * kCpuChunk;
    const int64_t n = entries[it.tensor].n;
    const int64_t end = begin + kCpuChunk < n ? begin + kCpuChunk : n;
    const int dtype = dtypes[it.tensor];
    bad[k] = cpu::any_nonfinite(cpu::offset(ptrs[it.tensor], dtype, begin), dtype,
                                end - begin) ? 1 : 0;
  });
  return bad;
}

}  // namespace

bool nonfinite_multi_cpu(const std::vector<const void*>& ptrs, const std::vector<int64_t>& sizes,
                         const std::vector<int>& dtypes, int num_threads) {
  std::vector<MTItem> items;
  for (unsigned char b : nonfinite_items(ptrs, sizes, dtypes, num_threads, items)) {
    if (b) return true;
  }
  return false;
}

void nonfinite_flags_multi_cpu(const std::vector<const void*>& ptrs,
                               const std::vector<int64_t>& sizes, const std::vector<int>& dtypes,
                               uint8_t* flags, int num_threads) {
  std::vector<MTItem> items;
  const std::vector<unsigned char> bad = nonfinite_items(ptrs, sizes, dtypes, num_threads, items);
  const size_t T = ptrs.size();
  for (size_t t = 0; t <= T; ++t) flags[t] = 0;
  for (size_t k = 0; k < items.size(); ++k) {
    if (bad[k]) {
      flags[items[k].tensor] = 1;
      flags[T] = 1;
    }
  }
}

}  // namespace lowrank_fused
