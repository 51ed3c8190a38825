// Host-side entry points of the CUDA kernels, declared without any CUDA header so that
// bindings.cpp builds with a plain C++ compiler. Compiled in only with LOWRANK_FUSED_WITH_CUDA.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "adamw_step.h"
#include "multi_tensor.h"
#include "small_cholesky.h"

namespace lowrank_fused {

// "ok", or why the CUDA runtime linked into the module cannot be used (no driver, no device).
std::string cuda_runtime_status();

// CUDA runtime version this module was compiled against (CUDART_VERSION) and the driver's
// version (0 when there is no driver).
int cuda_runtime_version();
int cuda_driver_version();

// Launches the AdamW step on `stream` (a cudaStream_t as an integer; 0 is the legacy default
// stream) of device `device`. Returns "" on success, else the CUDA error as text.
std::string adamw_step_cuda(const AdamWArgs& a, int device, std::uintptr_t stream);

// Batched small Cholesky inverse (small_cholesky.h) on `stream` of `device`.
std::string small_cholesky_inverse_cuda(const SmallCholeskyArgs& a, int device,
                                        std::uintptr_t stream);

// Multi-tensor ops (multi_tensor.h): one kernel launch for all tensors on `stream` of `device`.
std::string adam_moments_multi_cuda(const MomentsMultiArgs& a, int device, std::uintptr_t stream);
std::string adamw_step_multi_cuda(const AdamWMultiArgs& a, int device, std::uintptr_t stream);

// Per-tensor non-finite flags of many buffers (dtype codes 0 float32, 1 bfloat16, 2 float16,
// 3 float64) into `flags` (len(ptrs) + 1 device bytes: one per tensor, then any) in one launch.
std::string nonfinite_flags_multi_cuda(const std::vector<const void*>& ptrs,
                                       const std::vector<int64_t>& sizes,
                                       const std::vector<int>& dtypes, uint8_t* flags,
                                       int device, std::uintptr_t stream);

}  // namespace lowrank_fused
