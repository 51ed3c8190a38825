// Fused elementwise AdamW step for non-projected parameters (docs/methods/adamw.md).
//
// The per-element math lives here, once, as an inline __host__ __device__ function: the CPU
// twin (csrc/cpu/adamw_step.cpp) and the CUDA kernel (csrc/cuda/adamw_step.cu) both call it,
// so testing the CPU twin against the eager reference tests the CUDA arithmetic too.
//
// Every operation is one IEEE-rounded fp32 operation in the order of the eager reference
// (lowrank_fused/reference/adamw_step.py); nothing may be contracted into an FMA. On the
// device the *_rn intrinsics guarantee that whatever the flags; on the host the build passes
// -ffp-contract=off -fno-fast-math. Scalars arrive as doubles (Python floats) and are rounded
// to fp32 once, on the host, exactly as torch does when it multiplies an fp32 tensor by a
// Python scalar: e.g. (1 - beta1) is formed in double and then rounded.
//
// This header includes no torch and no CUDA header, so bindings.cpp and the CPU twin build
// with a plain C++ compiler.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define LF_HD __host__ __device__ __forceinline__
#else
#define LF_HD inline
#endif

namespace lowrank_fused {

// Storage dtype codes, as passed from Python (lowrank_fused/_ext_ops.py).
enum DTypeCode : int { kFloat32 = 0, kBFloat16 = 1 };

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

// bfloat16 storage: the raw 16 bits. Conversions are done by hand so host and device agree.
struct bf16 {
  uint16_t bits;
};

LF_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

LF_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// fp32 -> bf16, round to nearest even; NaN -> 0x7FC0 (as c10::BFloat16 does).
LF_HD bf16 float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>(0x7fc0u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}

LF_HD float to_float(float x) { return x; }
LF_HD float to_float(bf16 x) { return bits_float(static_cast<uint32_t>(x.bits) << 16); }

LF_HD void store(float* p, float x) { *p = x; }
LF_HD void store(bf16* p, float x) { *p = float_to_bf16(x); }

// One IEEE-rounded fp32 operation each; never fused.
LF_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
LF_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
LF_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
LF_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
LF_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// The step's scalars, already rounded to fp32 (see make_scalars).
struct AdamWScalars {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, c1, c2, pre_scale, post_decay;
  bool do_pre_scale, do_post_decay;
};

inline AdamWScalars make_scalars(double lr, double beta1, double beta2, double eps, double c1,
                                 double c2, double pre_scale, double post_decay) {
  AdamWScalars s;
  s.lr = static_cast<float>(lr);
  s.beta1 = static_cast<float>(beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.c1 = static_cast<float>(c1);
  s.c2 = static_cast<float>(c2);
  s.pre_scale = static_cast<float>(pre_scale);
  s.post_decay = static_cast<float>(post_decay);
  // decided in double, as the reference decides with Python floats
  s.do_pre_scale = pre_scale != 1.0;
  s.do_post_decay = post_decay != 0.0;
  return s;
}

// One element, in place on w, m, v:
//   w = w*pre_scale; m = m*b1 + (1-b1)*g; v = v*b2 + (1-b2)*(g*g)  (stored, then re-read);
//   w = w - lr*((m/c1)/(sqrt(v/c2)+eps)); w = w - post_decay*w.
template <typename TW, typename TG, typename TS>
LF_HD void adamw_element(TW* w_p, const TG* g_p, TS* m_p, TS* v_p, const AdamWScalars& s) {
  const float g = to_float(*g_p);
  float w = to_float(*w_p);
  if (s.do_pre_scale) w = mul_rn(w, s.pre_scale);
  float m = add_rn(mul_rn(to_float(*m_p), s.beta1), mul_rn(s.one_minus_beta1, g));
  store(m_p, m);
  m = to_float(*m_p);
  float v = add_rn(mul_rn(to_float(*v_p), s.beta2), mul_rn(s.one_minus_beta2, mul_rn(g, g)));
  store(v_p, v);
  v = to_float(*v_p);
  const float denom = add_rn(sqrt_rn(div_rn(v, s.c2)), s.eps);
  w = sub_rn(w, mul_rn(s.lr, div_rn(div_rn(m, s.c1), denom)));
  if (s.do_post_decay) w = sub_rn(w, mul_rn(s.post_decay, w));
  store(w_p, w);
}

// Everything one launch needs: raw pointers, element count, dtype codes, scalars, and the
// optional skip flag: a one-byte bool (a 0-dim torch.bool tensor) in the buffers' memory, read
// by the kernel itself (never by the host of a CUDA launch); when it holds true nothing is
// written. Null: no flag.
struct AdamWArgs {
  void* w;
  const void* g;
  void* m;
  void* v;
  int64_t n;
  int w_dtype, g_dtype, mv_dtype;
  AdamWScalars s;
  const uint8_t* skip = nullptr;
};

inline void check_args(const AdamWArgs& a) {
  auto ok = [](int c) { return c == kFloat32 || c == kBFloat16; };
  if (!ok(a.w_dtype)) throw std::invalid_argument("adamw_step: W dtype code " + std::to_string(a.w_dtype) + " is not 0 (float32) or 1 (bfloat16)");
  if (!ok(a.g_dtype)) throw std::invalid_argument("adamw_step: G dtype code " + std::to_string(a.g_dtype) + " is not 0 (float32) or 1 (bfloat16)");
  if (!ok(a.mv_dtype)) throw std::invalid_argument("adamw_step: M/V dtype code " + std::to_string(a.mv_dtype) + " is not 0 (float32) or 1 (bfloat16)");
  if (a.n < 0) throw std::invalid_argument("adamw_step: n must be >= 0, got " + std::to_string(a.n));
  if (a.n > 0) {
    if (!a.w) throw std::invalid_argument("adamw_step: W pointer is null");
    if (!a.g) throw std::invalid_argument("adamw_step: G pointer is null");
    if (!a.m) throw std::invalid_argument("adamw_step: M pointer is null");
    if (!a.v) throw std::invalid_argument("adamw_step: V pointer is null");
  }
}

// Calls f(TW{}, TG{}, TS{}) with the storage types named by the codes (template dispatch,
// no table of symbols). The codes must have passed check_args.
template <typename F>
void dispatch_dtypes(int w_dtype, int g_dtype, int mv_dtype, F&& f) {
  auto with_type = [](int code, auto&& k) {
    if (code == kBFloat16) {
      k(bf16{});
    } else {
      k(float{});
    }
  };
  with_type(w_dtype, [&](auto tw) {
    with_type(g_dtype, [&](auto tg) {
      with_type(mv_dtype, [&](auto ts) { f(tw, tg, ts); });
    });
  });
}

// CPU twin (csrc/cpu/adamw_step.cpp). num_threads <= 0: OpenMP's default.
void adamw_step_cpu(const AdamWArgs& a, int num_threads);

}  // namespace lowrank_fused
