// CUDA kernels of the multi-tensor ops (multi_tensor.h): ONE launch per call, one block per
// (tensor, chunk) work item, whatever the number of tensors. The tables (entries, per-tensor
// scalars, work items) go to device memory in one stream-ordered allocation and one copy; the
// allocation is freed in stream order after the kernel. Built with --fmad=false; the math uses
// the *_rn intrinsics anyway.
//
// Norms: each block reduces its chunk's sum of n^2 in fp32 and atomically adds it to its
// tensor's slot (zeroed first on the stream), so the order of the additions (and the last bits
// of a norm of a multi-chunk tensor) may vary from run to run. The flag: a block that saw a
// non-finite input stores 1.
#include <cuda_runtime.h>

#include <cstring>
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

__global__ void __launch_bounds__(kThreads)
adam_moments_multi_kernel(const MTEntry* __restrict__ entries,
                          const MomentsScalars* __restrict__ scalars,
                          const MTItem* __restrict__ items, float* norms, int32_t* flag) {
  const MTItem it = items[blockIdx.x];
  const MTEntry e = entries[it.tensor];
  const MomentsScalars s = scalars[it.tensor];
  const int64_t begin = int64_t(it.chunk) * kChunk;
  const int64_t end = begin + kChunk < e.n ? begin + kChunk : e.n;
  float sq = 0.0f;
  bool bad = false;
  moments_range_any(e, s, begin + threadIdx.x, end, kThreads, norms != nullptr,
                    flag != nullptr, sq, bad);
  if (flag != nullptr) {
    if (__syncthreads_or(bad) && threadIdx.x == 0) *flag = 1;
  }
  if (norms != nullptr) {
    const float total = block_sum(sq);
    if (threadIdx.x == 0) atomicAdd(norms + it.tensor, total);
  }
}

__global__ void __launch_bounds__(kThreads)
adamw_step_multi_kernel(const MTEntry* __restrict__ entries,
                        const AdamWScalars* __restrict__ scalars,
                        const MTItem* __restrict__ items, int32_t* flag) {
  const MTItem it = items[blockIdx.x];
  const MTEntry e = entries[it.tensor];
  const AdamWScalars s = scalars[it.tensor];
  const int64_t begin = int64_t(it.chunk) * kChunk;
  const int64_t end = begin + kChunk < e.n ? begin + kChunk : e.n;
  bool bad = false;
  adamw_range_any(e, s, begin + threadIdx.x, end, kThreads, flag != nullptr, bad);
  if (flag != nullptr) {
    if (__syncthreads_or(bad) && threadIdx.x == 0) *flag = 1;
  }
}

size_t align_up(size_t x) { return (x + 255) / 256 * 256; }

// The three tables in one host buffer, at offsets 0, off_scalars, off_items.
template <typename S>
struct Tables {
  std::vector<unsigned char> host;
  size_t off_scalars = 0, off_items = 0;
  size_t n_items = 0;
};

template <typename S>
Tables<S> pack(const std::vector<MTEntry>& entries, const std::vector<S>& scalars) {
  Tables<S> t;
  const std::vector<MTItem> items = mt_work_items(entries, kChunk);
  t.n_items = items.size();
  const size_t e_bytes = entries.size() * sizeof(MTEntry);
  const size_t s_bytes = scalars.size() * sizeof(S);
  const size_t i_bytes = items.size() * sizeof(MTItem);
  t.off_scalars = align_up(e_bytes);
  t.off_items = t.off_scalars + align_up(s_bytes);
  t.host.assign(t.off_items + i_bytes, 0);
  if (e_bytes) std::memcpy(t.host.data(), entries.data(), e_bytes);
  if (s_bytes) std::memcpy(t.host.data() + t.off_scalars, scalars.data(), s_bytes);
  if (i_bytes) std::memcpy(t.host.data() + t.off_items, items.data(), i_bytes);
  return t;
}

// Sets the device, uploads the tables, calls launch(device tables), frees them in stream
// order. Returns "" or the first CUDA error.
template <typename S, typename L>
std::string run_multi(const char* op, const std::vector<MTEntry>& entries,
                      const std::vector<S>& scalars, int device, std::uintptr_t stream_handle,
                      float* zero_first, size_t zero_count, L&& launch) {
  const std::string name(op);
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return cuda_error((name + ": cudaSetDevice").c_str(), err);
  (void)cudaGetLastError();  // clear a stale error of an earlier call, reported then
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (zero_first != nullptr && zero_count > 0) {
    err = cudaMemsetAsync(zero_first, 0, zero_count * sizeof(float), stream);
    if (err != cudaSuccess) return cuda_error((name + ": cudaMemsetAsync").c_str(), err);
  }
  Tables<S> t = pack(entries, scalars);
  if (t.n_items == 0) return "";
  void* dev = nullptr;
  err = cudaMallocAsync(&dev, t.host.size(), stream);
  if (err != cudaSuccess) return cuda_error((name + ": cudaMallocAsync").c_str(), err);
  // pageable source: returns once the bytes are staged, so `t` may go out of scope after
  err = cudaMemcpyAsync(dev, t.host.data(), t.host.size(), cudaMemcpyHostToDevice, stream);
  if (err != cudaSuccess) {
    (void)cudaFreeAsync(dev, stream);
    return cuda_error((name + ": cudaMemcpyAsync").c_str(), err);
  }
  unsigned char* base = static_cast<unsigned char*>(dev);
  launch(static_cast<unsigned>(t.n_items), stream, reinterpret_cast<const MTEntry*>(base),
         reinterpret_cast<const S*>(base + t.off_scalars),
         reinterpret_cast<const MTItem*>(base + t.off_items));
  const cudaError_t launch_err = cudaGetLastError();
  err = cudaFreeAsync(dev, stream);
  if (launch_err != cudaSuccess) return cuda_error((name + ": kernel launch").c_str(), launch_err);
  if (err != cudaSuccess) return cuda_error((name + ": cudaFreeAsync").c_str(), err);
  return "";
}

}  // namespace

std::string adam_moments_multi_cuda(const MomentsMultiArgs& a, int device,
                                    std::uintptr_t stream) {
  check_moments_multi_args(a);
  if (a.entries.empty()) return "";
  return run_multi("adam_moments_multi", a.entries, a.scalars, device, stream, a.norms,
                   a.entries.size(),
                   [&](unsigned blocks, cudaStream_t st, const MTEntry* e,
                       const MomentsScalars* s, const MTItem* items) {
                     adam_moments_multi_kernel<<<blocks, kThreads, 0, st>>>(e, s, items,
                                                                            a.norms, a.flag);
                   });
}

std::string adamw_step_multi_cuda(const AdamWMultiArgs& a, int device, std::uintptr_t stream) {
  check_adamw_multi_args(a);
  if (a.entries.empty()) return "";
  return run_multi("adamw_step_multi", a.entries, a.scalars, device, stream, nullptr, 0,
                   [&](unsigned blocks, cudaStream_t st, const MTEntry* e,
                       const AdamWScalars* s, const MTItem* items) {
                     adamw_step_multi_kernel<<<blocks, kThreads, 0, st>>>(e, s, items, a.flag);
                   });
}

}  // namespace lowrank_fused
