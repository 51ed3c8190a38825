// CUDA kernel of the fused elementwise AdamW step: one thread per element (grid-stride), the
// per-element math shared with the CPU twin (adamw_step.h). Built with --fmad=false; the math
// uses the *_rn intrinsics anyway, so no FMA contraction whatever the flags.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "adamw_step.h"
#include "cuda/launchers.h"

namespace lowrank_fused {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

template <typename TW, typename TG, typename TS>
__global__ void __launch_bounds__(kThreads)
adamw_step_kernel(TW* __restrict__ w, const TG* __restrict__ g, TS* __restrict__ m,
                  TS* __restrict__ v, int64_t n, AdamWScalars s,
                  const uint8_t* __restrict__ skip) {
  if (skip != nullptr && *skip != 0) return;  // the step is skipped: nothing is written
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    adamw_element(w + i, g + i, m + i, v + i, s);
  }
}

std::string cuda_error(const char* what, cudaError_t err) {
  return std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

}  // namespace

std::string cuda_runtime_status() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return cuda_error("cudaGetDeviceCount", err);
  if (count == 0) return "cudaGetDeviceCount: no CUDA device";
  return "ok";
}

int cuda_runtime_version() { return CUDART_VERSION; }

int cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

std::string adamw_step_cuda(const AdamWArgs& a, int device, std::uintptr_t stream_handle) {
  check_args(a);
  if (a.n == 0) return "";
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return cuda_error("adamw_step: cudaSetDevice", err);
  (void)cudaGetLastError();  // clear a stale error of an earlier call, reported then
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t blocks = std::min<int64_t>((a.n + kThreads - 1) / kThreads, kMaxBlocks);
  dispatch_dtypes(a.w_dtype, a.g_dtype, a.mv_dtype, [&](auto tw, auto tg, auto ts) {
    using TW = decltype(tw);
    using TG = decltype(tg);
    using TS = decltype(ts);
    adamw_step_kernel<TW, TG, TS><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<TW*>(a.w), static_cast<const TG*>(a.g), static_cast<TS*>(a.m),
        static_cast<TS*>(a.v), a.n, a.s, a.skip);
  });
  err = cudaGetLastError();
  if (err != cudaSuccess) return cuda_error("adamw_step: kernel launch", err);
  return "";
}

}  // namespace lowrank_fused
