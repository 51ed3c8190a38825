// Vectorised elementwise spans of the CPU twins (see elementwise.h): one set of loops,
// instantiated for the x86-64 baseline, AVX2 and AVX-512 through target attributes and picked
// at run time.
#include "cpu/elementwise.h"

#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define LF_X86_DISPATCH 1
#define LF_TARGET_AVX2 __attribute__((target("avx2")))
#define LF_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#else
#define LF_X86_DISPATCH 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define LF_INLINE inline __attribute__((always_inline))
#else
#define LF_INLINE inline
#endif

namespace lowrank_fused {
namespace cpu {

namespace {

// bf16 buffers are walked as uint16_t (the raw bits), which the vectoriser handles.
LF_INLINE float load(const float* p, int64_t i) { return p[i]; }
LF_INLINE float load(const uint16_t* p, int64_t i) {
  return bits_float(static_cast<uint32_t>(p[i]) << 16);
}

// fp32 -> bf16 bits, round to nearest even, NaN -> 0x7FC0: float_to_bf16 without its branch.
LF_INLINE uint16_t bf16_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? static_cast<uint16_t>(0x7fc0u)
                                         : static_cast<uint16_t>(r);
}

LF_INLINE void store(float* p, int64_t i, float x) { p[i] = x; }
LF_INLINE void store(uint16_t* p, int64_t i, float x) { p[i] = bf16_bits(x); }

// Stores x and returns what re-reading it gives (the reference stores M and V, then reads them).
LF_INLINE float store_reread(float* p, int64_t i, float x) {
  p[i] = x;
  return x;
}
LF_INLINE float store_reread(uint16_t* p, int64_t i, float x) {
  const uint16_t b = bf16_bits(x);
  p[i] = b;
  return bits_float(static_cast<uint32_t>(b) << 16);
}

// adamw_element (adamw_step.h), operation for operation.
template <bool kPre, bool kPost, typename TW, typename TG, typename TS>
LF_INLINE void adamw_loop(TW* __restrict__ w, const TG* __restrict__ g, TS* __restrict__ m,
                          TS* __restrict__ v, int64_t n, const AdamWScalars& sref) {
  const float lr = sref.lr, b1 = sref.beta1, omb1 = sref.one_minus_beta1, b2 = sref.beta2,
              omb2 = sref.one_minus_beta2, eps = sref.eps, c1 = sref.c1, c2 = sref.c2,
              pre = sref.pre_scale, post = sref.post_decay;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = load(g, i);
    float wi = load(w, i);
    if (kPre) wi = mul_rn(wi, pre);
    const float mi = store_reread(m, i, add_rn(mul_rn(load(m, i), b1), mul_rn(omb1, gi)));
    const float vi =
        store_reread(v, i, add_rn(mul_rn(load(v, i), b2), mul_rn(omb2, mul_rn(gi, gi))));
    const float denom = add_rn(sqrt_rn(div_rn(vi, c2)), eps);
    wi = sub_rn(wi, mul_rn(lr, div_rn(div_rn(mi, c1), denom)));
    if (kPost) wi = sub_rn(wi, mul_rn(post, wi));
    store(w, i, wi);
  }
}

// key bits: 1 M/V bf16, 2 G bf16, 4 W bf16, 8 pre-scale, 16 post-decay
template <int K>
LF_INLINE void adamw_case(void* w, const void* g, void* m, void* v, int64_t n,
                          const AdamWScalars& s) {
  using TS = typename std::conditional<(K & 1) != 0, uint16_t, float>::type;
  using TG = typename std::conditional<(K & 2) != 0, uint16_t, float>::type;
  using TW = typename std::conditional<(K & 4) != 0, uint16_t, float>::type;
  adamw_loop<(K & 8) != 0, (K & 16) != 0>(static_cast<TW*>(w), static_cast<const TG*>(g),
                                          static_cast<TS*>(m), static_cast<TS*>(v), n, s);
}

template <int... K>
LF_INLINE void adamw_switch(int key, void* w, const void* g, void* m, void* v, int64_t n,
                            const AdamWScalars& s, std::integer_sequence<int, K...>) {
  (void)((key == K ? (adamw_case<K>(w, g, m, v, n, s), true) : false) || ...);
}

LF_INLINE void adamw_any(void* w, const void* g, void* m, void* v, int64_t n, int w_dtype,
                         int g_dtype, int mv_dtype, const AdamWScalars& s) {
  const int key = (mv_dtype == kBFloat16 ? 1 : 0) | (g_dtype == kBFloat16 ? 2 : 0) |
                  (w_dtype == kBFloat16 ? 4 : 0) | (s.do_pre_scale ? 8 : 0) |
                  (s.do_post_decay ? 16 : 0);
  adamw_switch(key, w, g, m, v, n, s, std::make_integer_sequence<int, 32>{});
}

// moments_element (multi_tensor.h) on fp32 buffers.
LF_INLINE void moments_fp32(const float* __restrict__ r, float* __restrict__ m,
                            float* __restrict__ v, float* __restrict__ nn, int64_t count,
                            const MomentsScalars& sref) {
  const float b1 = sref.beta1, omb1 = sref.one_minus_beta1, b2 = sref.beta2,
              omb2 = sref.one_minus_beta2, eps = sref.eps, c1 = sref.c1, c2 = sref.c2;
  for (int64_t i = 0; i < count; ++i) {
    const float ri = r[i];
    const float mi = add_rn(mul_rn(m[i], b1), mul_rn(omb1, ri));
    const float vi = add_rn(mul_rn(v[i], b2), mul_rn(omb2, mul_rn(ri, ri)));
    m[i] = mi;
    v[i] = vi;
    nn[i] = div_rn(div_rn(mi, c1), add_rn(sqrt_rn(div_rn(vi, c2)), eps));
  }
}

LF_INLINE double sum_squares(const float* __restrict__ x, int64_t count) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    for (int j = 0; j < 8; ++j) {
      const double xj = static_cast<double>(x[i + j]);
      acc[j] += xj * xj;
    }
  }
  for (; i < count; ++i) {
    const double xi = static_cast<double>(x[i]);
    acc[0] += xi * xi;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Non-finite <=> all exponent bits set: the largest masked word reaches the mask.
template <typename U>
LF_INLINE bool exponent_all_ones(const U* __restrict__ x, int64_t count, U mask) {
  U worst = 0;
  for (int64_t i = 0; i < count; ++i) {
    const U e = x[i] & mask;
    worst = e > worst ? e : worst;
  }
  return worst == mask;
}

LF_INLINE bool nonfinite_any(const void* x, int dtype, int64_t count) {
  switch (dtype) {
    case kFloat32:
      return exponent_all_ones(static_cast<const uint32_t*>(x), count, uint32_t(0x7f800000u));
    case kBFloat16:
      return exponent_all_ones(static_cast<const uint16_t*>(x), count, uint16_t(0x7f80u));
    case kFloat16Code:
      return exponent_all_ones(static_cast<const uint16_t*>(x), count, uint16_t(0x7c00u));
    default:
      return exponent_all_ones(static_cast<const uint64_t*>(x), count,
                               uint64_t(0x7ff0000000000000ull));
  }
}

struct Kernels {
  const char* name;
  void (*adamw)(void*, const void*, void*, void*, int64_t, int, int, int, const AdamWScalars&);
  void (*moments)(const float*, float*, float*, float*, int64_t, const MomentsScalars&);
  double (*sumsq)(const float*, int64_t);
  bool (*nonfinite)(const void*, int, int64_t);
};

#define LF_DEFINE_KERNELS(NAME, ATTR)                                                         \
  ATTR void adamw_##NAME(void* w, const void* g, void* m, void* v, int64_t n, int wd, int gd, \
                         int sd, const AdamWScalars& s) {                                     \
    adamw_any(w, g, m, v, n, wd, gd, sd, s);                                                  \
  }                                                                                           \
  ATTR void moments_##NAME(const float* r, float* m, float* v, float* nn, int64_t count,      \
                           const MomentsScalars& s) {                                         \
    moments_fp32(r, m, v, nn, count, s);                                                      \
  }                                                                                           \
  ATTR double sumsq_##NAME(const float* x, int64_t count) { return sum_squares(x, count); }   \
  ATTR bool nonfinite_##NAME(const void* x, int dtype, int64_t count) {                       \
    return nonfinite_any(x, dtype, count);                                                    \
  }                                                                                           \
  const Kernels kKernels_##NAME = {#NAME, adamw_##NAME, moments_##NAME, sumsq_##NAME,         \
                                   nonfinite_##NAME};

LF_DEFINE_KERNELS(baseline, )
#if LF_X86_DISPATCH
LF_DEFINE_KERNELS(avx2, LF_TARGET_AVX2)
LF_DEFINE_KERNELS(avx512, LF_TARGET_AVX512)
#endif

// What this CPU can run, widest first.
struct IsaTable {
  const Kernels* kernels[3];
  const char* names[3];
  int count = 0;
  IsaTable() {
#if LF_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      add(&kKernels_avx512);
    }
    if (__builtin_cpu_supports("avx2")) add(&kKernels_avx2);
#endif
    add(&kKernels_baseline);
  }
  void add(const Kernels* k) {
    kernels[count] = k;
    names[count] = k->name;
    ++count;
  }
};

const IsaTable& table() {
  static const IsaTable t;
  return t;
}

std::atomic<const Kernels*>& current() {
  static std::atomic<const Kernels*> k{table().kernels[0]};
  return k;
}

}  // namespace

const char* isa_name() { return current().load(std::memory_order_relaxed)->name; }

const char* const* supported_isas(int* count) {
  *count = table().count;
  return table().names;
}

const char* set_isa(const char* name) {
  const IsaTable& t = table();
  for (int i = 0; i < t.count; ++i) {
    if (std::strcmp(t.names[i], name) == 0) {
      return current().exchange(t.kernels[i])->name;
    }
  }
  std::string have;
  for (int i = 0; i < t.count; ++i) have += std::string(i ? ", " : "") + t.names[i];
  throw std::invalid_argument(std::string("cpu isa must be one this CPU runs (") + have +
                              "), got '" + name + "'");
}

void adamw_span(void* w, const void* g, void* m, void* v, int64_t n, int w_dtype, int g_dtype,
                int mv_dtype, const AdamWScalars& s) {
  if (n > 0) current().load(std::memory_order_relaxed)->adamw(w, g, m, v, n, w_dtype, g_dtype,
                                                              mv_dtype, s);
}

void moments_span_fp32(const float* r, float* m, float* v, float* n, int64_t count,
                       const MomentsScalars& s) {
  if (count > 0) current().load(std::memory_order_relaxed)->moments(r, m, v, n, count, s);
}

double sum_squares_fp32(const float* x, int64_t count) {
  return current().load(std::memory_order_relaxed)->sumsq(x, count);
}

bool any_nonfinite(const void* x, int dtype, int64_t count) {
  if (count <= 0) return false;
  return current().load(std::memory_order_relaxed)->nonfinite(x, dtype, count);
}

}  // namespace cpu
}  // namespace lowrank_fused
