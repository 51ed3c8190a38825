// CUDA kernels of the multi-tensor ops (multi_tensor.h): one block per (tensor, chunk) work
// item. The tables (entries, per-tensor scalars, each tensor's first block) travel in the
// kernel's argument struct (__grid_constant__, up to ~31 KB: CUDA >= 12.1 on sm_70+), so a
// call is ONE launch with no allocation and no host-to-device copy (nothing that could make
// the host wait for the stream) for up to ~300 tensors (MTBatch::K: 351 for the moments,
// 297 for AdamW); a longer list is walked in batches of that many, one launch each. A block
// finds its tensor by binary search over the first-block table. Built with --fmad=false; the
// math uses the *_rn intrinsics anyway.
//
// Norms: each block reduces its chunk's sum of n^2 in fp32 and atomically adds it to its
// tensor's slot (zeroed first on the stream), so the order of the additions (and the last bits
// of a norm of a multi-chunk tensor) may vary from run to run. The flag: a block that saw a
// non-finite input stores 1.
//
// Scalars from a table (multi_tensor.h: a device table, the same address every call, what a
// CUDA-graph replay needs): a block reads its tensor's column instead of the argument struct's
// copy; the struct's scalars are then left unset.
//
// The skip flag (a device bool, or null): every block reads it first; when it holds true the
// block only scans its chunk of the input for the non-finite flag and writes nothing else, and
// the norms are zeroed by a small kernel that reads it too (instead of the memset of a call
// without a flag), so they keep their values. The host never reads it.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/launchers.h"
#include "multi_tensor.h"

namespace lowrank_fused {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = int64_t(1) << 14;  // elements per block

std::string cuda_error(const char* what, cudaError_t err) {
  return std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

__device__ __forceinline__ float block_sum(float x) {
  __shared__ float warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) x = __fadd_rn(x, __shfl_down_sync(0xffffffffu, x, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total = __fadd_rn(total, warp_sums[w]);
  }
  return total;  // valid in thread 0
}

constexpr size_t kParamBytes = 31000;  // under the 32764-byte kernel-argument limit

template <typename S>
struct BatchSize {
  static constexpr int value =
      static_cast<int>((kParamBytes - 64) / (sizeof(MTEntry) + sizeof(S) + sizeof(int32_t)));
};

// One launch's tables, passed by value. Tensor t of the batch owns blocks
// [first_block[t], first_block[t+1]).
template <typename S>
struct MTBatch {
  static constexpr int K = BatchSize<S>::value;
  MTEntry entries[K];
  S scalars[K];
  int32_t first_block[K + 1];
  int32_t count;
  int32_t first;  // the index of the batch's first tensor in the whole list
};
static_assert(sizeof(MTBatch<MomentsScalars>) <= kParamBytes, "kernel argument too large");
static_assert(sizeof(MTBatch<AdamWScalars>) <= kParamBytes, "kernel argument too large");

// The tensor owning this block (the last t whose first block is <= blockIdx.x; empty tensors
// own no block) and the chunk of it.
template <typename S>
__device__ __forceinline__ void locate(const MTBatch<S>& b, int& tensor, int64_t& chunk) {
  const int32_t bid = static_cast<int32_t>(blockIdx.x);
  int lo = 0, hi = b.count;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (b.first_block[mid] <= bid) lo = mid;
    else hi = mid;
  }
  tensor = lo;
  chunk = bid - b.first_block[lo];
}

// A skipped block: the non-finite flag from its chunk of the input buffer, nothing else. Every
// thread of the block read the same skip flag, so all of them reach the barrier.
__device__ __forceinline__ void flag_skipped_chunk(const MTEntry& e, int buffer, int64_t begin,
                                                   int64_t end, int32_t* flag) {
  if (flag == nullptr) return;
  const bool bad = range_nonfinite(e.ptr[buffer], e.dtype[buffer], begin + threadIdx.x, end,
                                   kThreads);
  if (__syncthreads_or(bad) && threadIdx.x == 0) *flag = 1;
}

// norms[i] = 0 for i < count unless *skip (the memset of a call with a skip flag).
__global__ void zero_unless_skipped_kernel(float* norms, int64_t count, const uint8_t* skip) {
  if (*skip != 0) return;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) norms[i] = 0.0f;
}

__global__ void __launch_bounds__(kThreads)
adam_moments_multi_kernel(const __grid_constant__ MTBatch<MomentsScalars> batch, float* norms,
                          int32_t* flag, const uint8_t* skip, const float* table,
                          int64_t table_count) {
  int t;
  int64_t chunk;
  locate(batch, t, chunk);
  const MTEntry& e = batch.entries[t];
  const int64_t begin = chunk * kChunk;
  const int64_t end = begin + kChunk < e.n ? begin + kChunk : e.n;
  if (skip != nullptr && *skip != 0) {
    flag_skipped_chunk(e, 0, begin, end, flag);
    return;
  }
  float sq = 0.0f;
  bool bad = false;
  const MomentsScalars s = table != nullptr
      ? moments_scalars_at(table, table_count, int64_t(batch.first) + t) : batch.scalars[t];
  moments_range_any(e, s, begin + threadIdx.x, end, kThreads, norms != nullptr,
                    flag != nullptr, sq, bad);
  if (flag != nullptr) {
    if (__syncthreads_or(bad) && threadIdx.x == 0) *flag = 1;
  }
  if (norms != nullptr) {
    const float total = block_sum(sq);
    if (threadIdx.x == 0) atomicAdd(norms + t, total);
  }
}

__global__ void __launch_bounds__(kThreads)
adamw_step_multi_kernel(const __grid_constant__ MTBatch<AdamWScalars> batch, int32_t* flag,
                        const uint8_t* skip, const float* table, int64_t table_count) {
  int t;
  int64_t chunk;
  locate(batch, t, chunk);
  const MTEntry& e = batch.entries[t];
  const int64_t begin = chunk * kChunk;
  const int64_t end = begin + kChunk < e.n ? begin + kChunk : e.n;
  if (skip != nullptr && *skip != 0) {
    flag_skipped_chunk(e, 1, begin, end, flag);
    return;
  }
  bool bad = false;
  const AdamWScalars s = table != nullptr
      ? adamw_scalars_at(table, table_count, int64_t(batch.first) + t) : batch.scalars[t];
  adamw_range_any(e, s, begin + threadIdx.x, end, kThreads, flag != nullptr, bad);
  if (flag != nullptr) {
    if (__syncthreads_or(bad) && threadIdx.x == 0) *flag = 1;
  }
}

// Sets the device, zeroes `zero_first` (zero_count floats) on the stream (unless `skip`, a
// device flag or null, holds true), then for each batch of tensors fills an MTBatch and calls
// launch(batch, blocks, first tensor index, stream). Returns "" or the first CUDA error.
template <typename S, typename L>
std::string run_multi(const char* op, const std::vector<MTEntry>& entries,
                      const std::vector<S>& scalars, int device, std::uintptr_t stream_handle,
                      float* zero_first, size_t zero_count, const uint8_t* skip, L&& launch) {
  const std::string name(op);
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return cuda_error((name + ": cudaSetDevice").c_str(), err);
  (void)cudaGetLastError();  // clear a stale error of an earlier call, reported then
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (zero_first != nullptr && zero_count > 0) {
    if (skip == nullptr) {
      err = cudaMemsetAsync(zero_first, 0, zero_count * sizeof(float), stream);
      if (err != cudaSuccess) return cuda_error((name + ": cudaMemsetAsync").c_str(), err);
    } else {
      const int64_t count = static_cast<int64_t>(zero_count);
      zero_unless_skipped_kernel<<<static_cast<unsigned>((count + kThreads - 1) / kThreads),
                                   kThreads, 0, stream>>>(zero_first, count, skip);
      err = cudaGetLastError();
      if (err != cudaSuccess) return cuda_error((name + ": zeroing the norms").c_str(), err);
    }
  }
  constexpr int K = MTBatch<S>::K;
  MTBatch<S> batch;  // ~31 KB; filled per launch
  const size_t total = entries.size();
  for (size_t first = 0; first < total; first += K) {
    const int count = static_cast<int>(total - first < size_t(K) ? total - first : size_t(K));
    int64_t blocks = 0;
    for (int t = 0; t < count; ++t) {
      batch.entries[t] = entries[first + t];
      if (!scalars.empty()) batch.scalars[t] = scalars[first + t];  // else: from the table
      batch.first_block[t] = static_cast<int32_t>(blocks);
      blocks += (entries[first + t].n + kChunk - 1) / kChunk;
      if (blocks > int64_t(INT32_MAX)) {
        return name + ": too many elements for one launch (more than 2^31 chunks)";
      }
    }
    batch.first_block[count] = static_cast<int32_t>(blocks);
    batch.count = count;
    batch.first = static_cast<int32_t>(first);
    if (blocks == 0) continue;
    launch(batch, static_cast<unsigned>(blocks), first, stream);
    err = cudaGetLastError();
    if (err != cudaSuccess) return cuda_error((name + ": kernel launch").c_str(), err);
  }
  return "";
}

}  // namespace

std::string adam_moments_multi_cuda(const MomentsMultiArgs& a, int device,
                                    std::uintptr_t stream) {
  check_moments_multi_args(a);
  if (a.entries.empty()) return "";
  return run_multi("adam_moments_multi", a.entries, a.scalars, device, stream, a.norms,
                   a.entries.size(), a.skip,
                   [&](const MTBatch<MomentsScalars>& batch, unsigned blocks, size_t first,
                       cudaStream_t st) {
                     adam_moments_multi_kernel<<<blocks, kThreads, 0, st>>>(
                         batch, a.norms != nullptr ? a.norms + first : nullptr, a.flag, a.skip,
                         a.table, static_cast<int64_t>(a.entries.size()));
                   });
}

std::string adamw_step_multi_cuda(const AdamWMultiArgs& a, int device, std::uintptr_t stream) {
  check_adamw_multi_args(a);
  if (a.entries.empty()) return "";
  return run_multi("adamw_step_multi", a.entries, a.scalars, device, stream, nullptr, 0, a.skip,
                   [&](const MTBatch<AdamWScalars>& batch, unsigned blocks, size_t,
                       cudaStream_t st) {
                     adamw_step_multi_kernel<<<blocks, kThreads, 0, st>>>(
                         batch, a.flag, a.skip, a.table, static_cast<int64_t>(a.entries.size()));
                   });
}

// -- per-tensor non-finite flags (nonfinite_flags_multi) ------------------------------------
// One launch (per ~1200 tensors) over the (tensor, chunk) items of every tensor; the flags are
// zeroed on the stream first, then a block that saw a NaN or an infinity in its chunk stores 1
// into its tensor's flag and into the any-flag after the last tensor (every writer stores the
// same value, so the races are benign). Nothing is read back: the caller keeps the flags on the
// device (the optimizers' on-device skip) and copies them to the host asynchronously.

namespace {

struct FlagBatch {
  static constexpr int K = static_cast<int>((kParamBytes - 64) / (8 + 8 + 4 + 4));
  const void* ptr[K];
  int64_t n[K];
  int32_t dtype[K];
  int32_t first_block[K + 1];
  int32_t count;
  int32_t base;  // the index of the batch's first tensor in the whole list
};
static_assert(sizeof(FlagBatch) <= kParamBytes, "kernel argument too large");

// Whether elements begin, begin+stride, ... < end of a buffer of dtype code `dtype` (0 float32,
// 1 bfloat16, 2 float16, 3 float64) hold a NaN or an infinity: the exponent bits all set.
__device__ __forceinline__ bool chunk_nonfinite(const void* p, int dtype, int64_t begin,
                                                int64_t end, int64_t stride) {
  bool bad = false;
  if (dtype == 0) {
    const uint32_t* x = static_cast<const uint32_t*>(p);
    for (int64_t i = begin; i < end; i += stride) bad |= (x[i] & 0x7f800000u) == 0x7f800000u;
  } else if (dtype == 1) {
    const uint16_t* x = static_cast<const uint16_t*>(p);
    for (int64_t i = begin; i < end; i += stride) bad |= (x[i] & 0x7f80u) == 0x7f80u;
  } else if (dtype == 2) {
    const uint16_t* x = static_cast<const uint16_t*>(p);
    for (int64_t i = begin; i < end; i += stride) bad |= (x[i] & 0x7c00u) == 0x7c00u;
  } else {
    const uint64_t* x = static_cast<const uint64_t*>(p);
    for (int64_t i = begin; i < end; i += stride) {
      bad |= (x[i] & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
    }
  }
  return bad;
}

__global__ void __launch_bounds__(kThreads)
nonfinite_flags_kernel(const __grid_constant__ FlagBatch batch, uint8_t* flags, int64_t total) {
  const int32_t bid = static_cast<int32_t>(blockIdx.x);
  int lo = 0, hi = batch.count;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (batch.first_block[mid] <= bid) lo = mid;
    else hi = mid;
  }
  const int64_t begin = int64_t(bid - batch.first_block[lo]) * kChunk;
  const int64_t n = batch.n[lo];
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  const bool bad = chunk_nonfinite(batch.ptr[lo], batch.dtype[lo], begin + threadIdx.x, end,
                                   kThreads);
  if (__syncthreads_or(bad) && threadIdx.x == 0) {
    flags[batch.base + lo] = 1;
    flags[total] = 1;
  }
}

}  // namespace

std::string nonfinite_flags_multi_cuda(const std::vector<const void*>& ptrs,
                                       const std::vector<int64_t>& sizes,
                                       const std::vector<int>& dtypes, uint8_t* flags,
                                       int device, std::uintptr_t stream_handle) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return cuda_error("nonfinite_flags_multi: cudaSetDevice", err);
  (void)cudaGetLastError();
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const size_t total = ptrs.size();
  err = cudaMemsetAsync(flags, 0, total + 1, stream);
  if (err != cudaSuccess) return cuda_error("nonfinite_flags_multi: cudaMemsetAsync", err);
  constexpr int K = FlagBatch::K;
  FlagBatch batch;
  for (size_t first = 0; first < total; first += K) {
    const int count = static_cast<int>(total - first < size_t(K) ? total - first : size_t(K));
    int64_t blocks = 0;
    for (int t = 0; t < count; ++t) {
      batch.ptr[t] = ptrs[first + t];
      batch.n[t] = sizes[first + t];
      batch.dtype[t] = dtypes[first + t];
      batch.first_block[t] = static_cast<int32_t>(blocks);
      blocks += (sizes[first + t] + kChunk - 1) / kChunk;
      if (blocks > int64_t(INT32_MAX)) {
        return "nonfinite_flags_multi: too many elements for one launch (more than 2^31 chunks)";
      }
    }
    batch.first_block[count] = static_cast<int32_t>(blocks);
    batch.count = count;
    batch.base = static_cast<int32_t>(first);
    if (blocks == 0) continue;
    nonfinite_flags_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        batch, flags, static_cast<int64_t>(total));
    err = cudaGetLastError();
    if (err != cudaSuccess) return cuda_error("nonfinite_flags_multi: kernel launch", err);
  }
  return "";
}

}  // namespace lowrank_fused
