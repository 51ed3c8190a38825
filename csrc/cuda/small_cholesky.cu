// CUDA kernel of the batched small Cholesky inverse (small_cholesky.h): one thread per matrix,
// the per-matrix routine shared with the CPU twin. k x k with k of a few dozen: the whole
// factorization is a few microseconds of one thread, and a refresh has tens to hundreds of
// matrices, so this launch is never the bottleneck next to the Gram GEMMs around it.
#include <cuda_runtime.h>

#include <string>

#include "cuda/launchers.h"
#include "small_cholesky.h"

namespace lowrank_fused {

namespace {

constexpr int kThreads = 64;

__global__ void __launch_bounds__(kThreads)
small_cholesky_inverse_kernel(const float* __restrict__ gram, float* __restrict__ linv,
                              int32_t* __restrict__ ok, int64_t batch, int64_t k, double tol) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  ok[b] = small_cholesky_inverse_one(gram + b * k * k, linv + b * k * k, k, tol);
}

}  // namespace

std::string small_cholesky_inverse_cuda(const SmallCholeskyArgs& a, int device,
                                        std::uintptr_t stream) {
  check_small_cholesky_args(a);
  if (a.batch == 0 || a.k == 0) return "";
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return std::string("cudaSetDevice: ") + cudaGetErrorString(err);
  const int64_t blocks = (a.batch + kThreads - 1) / kThreads;
  small_cholesky_inverse_kernel<<<static_cast<unsigned>(blocks), kThreads, 0,
                                  reinterpret_cast<cudaStream_t>(stream)>>>(
      a.gram, a.linv, a.ok, a.batch, a.k, a.pivot_ratio_tol);
  err = cudaGetLastError();
  if (err != cudaSuccess) return std::string("small_cholesky_inverse_kernel: ") +
                                 cudaGetErrorString(err);
  return "";
}

}  // namespace lowrank_fused
