// Vectorised spans of the CPU twins' elementwise math (csrc/cpu/elementwise.cpp), shared by
// the single AdamW step (adamw_step.cpp) and the multi-tensor ops (multi_tensor.cpp).
//
// Each span is the per-element function of adamw_step.h / multi_tensor.h, rewritten as a loop
// the compiler vectorises: __restrict__ pointers, the loop-invariant branches (weight-decay
// modes, storage dtypes) hoisted into template parameters, bf16 rounding branch-free. Every
// operation is still one IEEE-rounded fp32 operation in the reference's order (vector
// mul/add/div/sqrt round exactly as the scalar ones; the build forbids contraction), so every
// instruction set gives the same bits as the scalar code and the eager reference.
//
// The loops are compiled three times (x86-64 baseline, AVX2, AVX-512) and the widest one the
// CPU supports is picked once at run time, so a wheel built on one machine runs on any x86-64
// machine; other architectures get the baseline build only.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "adamw_step.h"
#include "multi_tensor.h"

namespace lowrank_fused {
namespace cpu {

// The instruction set the spans run with: "avx512", "avx2" or "baseline".
const char* isa_name();
// The instruction sets this CPU (and this build) can run, widest first.
const char* const* supported_isas(int* count);
// Forces the spans onto `name` (for tests and benchmarks); throws std::invalid_argument when
// the name is unknown or the CPU cannot run it. Returns the previous name.
const char* set_isa(const char* name);

// One AdamW step over n elements (dtype codes as in AdamWArgs; M and V share mv_dtype).
void adamw_span(void* w, const void* g, void* m, void* v, int64_t n, int w_dtype, int g_dtype,
                int mv_dtype, const AdamWScalars& s);

// K2 over n fp32 elements: m, v updated in place, n written (moments_element's math).
void moments_span_fp32(const float* r, float* m, float* v, float* n, int64_t count,
                       const MomentsScalars& s);

// Sum of x^2 in double over eight fixed partial sums (the order never depends on the ISA).
double sum_squares_fp32(const float* x, int64_t count);

// Whether x (count elements of dtype code: 0 float32, 1 bfloat16, 2 float16, 3 float64)
// holds a NaN or an infinity.
bool any_nonfinite(const void* x, int dtype, int64_t count);

constexpr int kFloat16Code = 2;  // dtype codes any_nonfinite also takes
constexpr int kFloat64Code = 3;

// Bytes per element of a dtype code.
inline int64_t code_size(int dtype) {
  return dtype == kFloat64Code ? 8 : (dtype == kFloat32 ? 4 : 2);
}

template <typename P>
inline P* offset(P* p, int dtype, int64_t i) {
  using Byte = typename std::conditional<std::is_const<P>::value, const char, char>::type;
  return reinterpret_cast<P*>(reinterpret_cast<Byte*>(p) + i * code_size(dtype));
}

}  // namespace cpu

// Whether any of the host buffers (ptrs[t]: sizes[t] elements of dtype code dtypes[t], codes
// as cpu::any_nonfinite) holds a NaN or an infinity: one OpenMP loop over chunks of all of
// them (csrc/cpu/multi_tensor.cpp).
bool nonfinite_multi_cpu(const std::vector<const void*>& ptrs, const std::vector<int64_t>& sizes,
                         const std::vector<int>& dtypes, int num_threads);

// Per-tensor flags (same inputs as nonfinite_multi_cpu): flags[t] = 1 when tensor t holds a NaN
// or an infinity, else 0, and flags[T] = 1 when any does (T + 1 bytes, all written).
void nonfinite_flags_multi_cpu(const std::vector<const void*>& ptrs,
                               const std::vector<int64_t>& sizes, const std::vector<int>& dtypes,
                               uint8_t* flags, int num_threads);

}  // namespace lowrank_fused
