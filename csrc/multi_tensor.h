// Multi-tensor apply: ONE pass (one CUDA launch, one OpenMP loop) over many tensors
// of different sizes, e.g. the low-rank moments of every layer or the dense AdamW step of every
// non-projected parameter.
//
// The pattern. The host packs one MTEntry per tensor (the addresses of its up to four buffers,
// its element count and the storage dtype of each buffer) and that tensor's scalars, then cuts
// every tensor into chunks of `chunk` elements; each work item (a CUDA block, or one iteration
// of the OpenMP loop) is one (tensor, chunk) pair. A block reads its item, its tensor's entry
// and scalars, and walks the chunk. On CUDA the tables travel in the kernel's argument struct
// (~31 KB), so one launch covers up to ~300 tensors (longer lists: one launch per ~300).
//
// The per-element math is shared by the CPU twin (csrc/cpu/multi_tensor.cpp) and the CUDA
// kernels (csrc/cuda/multi_tensor.cu), as for adamw_step.h:
//   adam_moments_multi: the K2 moment update of the single adam_moments op (reference
//     lowrank_fused/reference/adam_moments.py): m = b1*m + (1-b1)*r, stored then re-read;
//     v = b2*v + (1-b2)*(r*r), likewise; n = (m/c1)/(sqrt(v/c2)+eps), stored. Optionally the
//     per-tensor sum of the stored n^2 (norm-growth limiter) and a non-finite flag over R.
//   adamw_step_multi: adamw_element (adamw_step.h) per element; optionally the flag over G.
// Each operation is one IEEE-rounded fp32 operation, never contracted (see adamw_step.h).
//
// The non-finite flag is only ever *set* (to 1), never cleared: the caller zeroes it, may
// collect several calls into it, and reads it once.
//
// The skip flag (optional; a one-byte bool, a 0-dim torch.bool tensor, read by the kernels
// themselves, never by the host of a CUDA launch): when it holds true no state, weight or norm
// is written; the non-finite flag is still set from the inputs as without it.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "adamw_step.h"

namespace lowrank_fused {

constexpr int kMTMaxBuffers = 4;

// One tensor of a multi-tensor call: its buffers (the lists' entries at one index), element
// count and per-buffer dtype codes (kFloat32 / kBFloat16).
struct MTEntry {
  void* ptr[kMTMaxBuffers];
  int64_t n;
  int32_t dtype[kMTMaxBuffers];
};

// One work item: chunk `chunk` (elements [chunk*C, min((chunk+1)*C, n))) of tensor `tensor`.
struct MTItem {
  int32_t tensor;
  int32_t chunk;
};

// The (tensor, chunk) work items of `entries`, tensors in order; empty tensors get none.
inline std::vector<MTItem> mt_work_items(const std::vector<MTEntry>& entries, int64_t chunk) {
  std::vector<MTItem> items;
  for (size_t t = 0; t < entries.size(); ++t) {
    const int64_t chunks = (entries[t].n + chunk - 1) / chunk;
    for (int64_t c = 0; c < chunks; ++c) {
      items.push_back(MTItem{static_cast<int32_t>(t), static_cast<int32_t>(c)});
    }
  }
  return items;
}

// Per-tensor scalars of the moment update, rounded to fp32 once on the host (as torch rounds a
// Python scalar multiplying an fp32 tensor; (1 - beta) is formed in double, then rounded).
struct MomentsScalars {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, c1, c2;
};

inline MomentsScalars make_moments_scalars(double beta1, double beta2, double eps, double c1,
                                           double c2) {
  MomentsScalars s;
  s.beta1 = static_cast<float>(beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.c1 = static_cast<float>(c1);
  s.c2 = static_cast<float>(c2);
  return s;
}

LF_HD bool is_nonfinite(float x) { return (float_bits(x) & 0x7f800000u) == 0x7f800000u; }

// One element of K2, in place on m, v; writes n. Returns the stored n (as fp32).
template <typename TS, typename TN>
LF_HD float moments_element(const float* r_p, TS* m_p, TS* v_p, TN* n_p,
                            const MomentsScalars& s) {
  const float r = *r_p;
  float m = add_rn(mul_rn(to_float(*m_p), s.beta1), mul_rn(s.one_minus_beta1, r));
  store(m_p, m);
  m = to_float(*m_p);
  float v = add_rn(mul_rn(to_float(*v_p), s.beta2), mul_rn(s.one_minus_beta2, mul_rn(r, r)));
  store(v_p, v);
  v = to_float(*v_p);
  const float nv = div_rn(div_rn(m, s.c1), add_rn(sqrt_rn(div_rn(v, s.c2)), s.eps));
  store(n_p, nv);
  return to_float(*n_p);
}

// Elements begin, begin+stride, ... < end of one tensor (buffers R, M, V, N). Adds the stored
// n^2 to `sq` when want_norm, sets `bad` when an r is non-finite and want_flag.
template <typename TS, typename TN, typename Acc>
LF_HD void moments_range(const MTEntry& e, const MomentsScalars& s, int64_t begin, int64_t end,
                         int64_t stride, bool want_norm, bool want_flag, Acc& sq, bool& bad) {
  const float* r = static_cast<const float*>(e.ptr[0]);
  TS* m = static_cast<TS*>(e.ptr[1]);
  TS* v = static_cast<TS*>(e.ptr[2]);
  TN* n = static_cast<TN*>(e.ptr[3]);
  for (int64_t i = begin; i < end; i += stride) {
    const float nv = moments_element(r + i, m + i, v + i, n + i, s);
    if (want_norm) sq += static_cast<Acc>(nv) * static_cast<Acc>(nv);
    if (want_flag && is_nonfinite(r[i])) bad = true;
  }
}

// moments_range with the storage types named by the entry's codes (M and V share one).
template <typename Acc>
LF_HD void moments_range_any(const MTEntry& e, const MomentsScalars& s, int64_t begin,
                             int64_t end, int64_t stride, bool want_norm, bool want_flag,
                             Acc& sq, bool& bad) {
  const bool s16 = e.dtype[1] == kBFloat16, n16 = e.dtype[3] == kBFloat16;
  if (s16) {
    if (n16) moments_range<bf16, bf16>(e, s, begin, end, stride, want_norm, want_flag, sq, bad);
    else moments_range<bf16, float>(e, s, begin, end, stride, want_norm, want_flag, sq, bad);
  } else {
    if (n16) moments_range<float, bf16>(e, s, begin, end, stride, want_norm, want_flag, sq, bad);
    else moments_range<float, float>(e, s, begin, end, stride, want_norm, want_flag, sq, bad);
  }
}

// Elements begin, begin+stride, ... < end of one tensor (buffers W, G, M, V) through
// adamw_element; sets `bad` when a g is non-finite and want_flag.
template <typename TW, typename TG, typename TS>
LF_HD void adamw_range(const MTEntry& e, const AdamWScalars& s, int64_t begin, int64_t end,
                       int64_t stride, bool want_flag, bool& bad) {
  TW* w = static_cast<TW*>(e.ptr[0]);
  const TG* g = static_cast<const TG*>(e.ptr[1]);
  TS* m = static_cast<TS*>(e.ptr[2]);
  TS* v = static_cast<TS*>(e.ptr[3]);
  for (int64_t i = begin; i < end; i += stride) {
    adamw_element(w + i, g + i, m + i, v + i, s);
    if (want_flag && is_nonfinite(to_float(g[i]))) bad = true;
  }
}

template <typename TW, typename TG>
LF_HD void adamw_range_s(const MTEntry& e, const AdamWScalars& s, int64_t begin, int64_t end,
                         int64_t stride, bool want_flag, bool& bad) {
  if (e.dtype[2] == kBFloat16) adamw_range<TW, TG, bf16>(e, s, begin, end, stride, want_flag, bad);
  else adamw_range<TW, TG, float>(e, s, begin, end, stride, want_flag, bad);
}

template <typename TW>
LF_HD void adamw_range_g(const MTEntry& e, const AdamWScalars& s, int64_t begin, int64_t end,
                         int64_t stride, bool want_flag, bool& bad) {
  if (e.dtype[1] == kBFloat16) adamw_range_s<TW, bf16>(e, s, begin, end, stride, want_flag, bad);
  else adamw_range_s<TW, float>(e, s, begin, end, stride, want_flag, bad);
}

// Whether one of the elements begin, begin+stride, ... < end of a float32 or bfloat16 buffer is
// a NaN or an infinity (the inputs' scan of a skipped call, which writes nothing else).
LF_HD bool range_nonfinite(const void* p, int dtype, int64_t begin, int64_t end,
                           int64_t stride) {
  bool bad = false;
  if (dtype == kBFloat16) {
    const bf16* x = static_cast<const bf16*>(p);
    for (int64_t i = begin; i < end; i += stride) bad |= is_nonfinite(to_float(x[i]));
  } else {
    const float* x = static_cast<const float*>(p);
    for (int64_t i = begin; i < end; i += stride) bad |= is_nonfinite(x[i]);
  }
  return bad;
}

// adamw_range with the storage types named by the entry's codes (M and V share one).
LF_HD void adamw_range_any(const MTEntry& e, const AdamWScalars& s, int64_t begin, int64_t end,
                           int64_t stride, bool want_flag, bool& bad) {
  if (e.dtype[0] == kBFloat16) adamw_range_g<bf16>(e, s, begin, end, stride, want_flag, bad);
  else adamw_range_g<float>(e, s, begin, end, stride, want_flag, bad);
}

// Per-step scalars from a table instead of the call's arguments (what a CUDA-graph replay
// needs: the kernel's arguments stay the same, the table's contents change): a float32 table of
// kColumns rows x `count` columns, value j of tensor t at table[j * count + t] (device memory for
// the CUDA kernels, host memory for the CPU twins). The rows are the fields of the scalar
// structs in order, (1 - beta) precomputed in double and rounded as make_*_scalars round them;
// AdamW's two switches are rows of 0/1, decided in double by the caller.
constexpr int kMomentsColumns = 7;   // beta1, 1-beta1, beta2, 1-beta2, eps, c1, c2
constexpr int kAdamWColumns = 12;    // lr, beta1, 1-beta1, beta2, 1-beta2, eps, c1, c2,
                                     // pre_scale, post_decay, do_pre_scale, do_post_decay

LF_HD MomentsScalars moments_scalars_at(const float* table, int64_t count, int64_t t) {
  MomentsScalars s;
  s.beta1 = table[t];
  s.one_minus_beta1 = table[count + t];
  s.beta2 = table[2 * count + t];
  s.one_minus_beta2 = table[3 * count + t];
  s.eps = table[4 * count + t];
  s.c1 = table[5 * count + t];
  s.c2 = table[6 * count + t];
  return s;
}

LF_HD AdamWScalars adamw_scalars_at(const float* table, int64_t count, int64_t t) {
  AdamWScalars s;
  s.lr = table[t];
  s.beta1 = table[count + t];
  s.one_minus_beta1 = table[2 * count + t];
  s.beta2 = table[3 * count + t];
  s.one_minus_beta2 = table[4 * count + t];
  s.eps = table[5 * count + t];
  s.c1 = table[6 * count + t];
  s.c2 = table[7 * count + t];
  s.pre_scale = table[8 * count + t];
  s.post_decay = table[9 * count + t];
  s.do_pre_scale = table[10 * count + t] != 0.0f;
  s.do_post_decay = table[11 * count + t] != 0.0f;
  return s;
}

// Everything one multi-tensor call needs. Buffers per entry: moments (R, M, V, N),
// adamw (W, G, M, V). With `table` set, `scalars` is empty and the scalars come from it.
struct MomentsMultiArgs {
  std::vector<MTEntry> entries;
  std::vector<MomentsScalars> scalars;  // one per entry
  float* norms = nullptr;               // (len(entries),) fp32, or null: no norms
  int32_t* flag = nullptr;              // one int32, or null: no flag
  const uint8_t* skip = nullptr;        // one bool, or null: never skipped
  const float* table = nullptr;         // kMomentsColumns x len(entries), or null
};

struct AdamWMultiArgs {
  std::vector<MTEntry> entries;
  std::vector<AdamWScalars> scalars;  // one per entry
  int32_t* flag = nullptr;
  const uint8_t* skip = nullptr;      // one bool, or null: never skipped
  const float* table = nullptr;       // kAdamWColumns x len(entries), or null
};

// Validates what Python handed over; throws std::invalid_argument (ValueError) naming the
// buffer and the tensor index. `names` are the four buffers' names.
inline void check_multi_entries(const char* op, const std::vector<MTEntry>& entries,
                                size_t n_scalars, const char* const names[kMTMaxBuffers],
                                bool first_fp32_only) {
  const std::string where(op);
  if (n_scalars != entries.size()) {
    throw std::invalid_argument(where + ": " + std::to_string(n_scalars) +
                                " scalar sets for " + std::to_string(entries.size()) +
                                " tensors");
  }
  if (entries.size() > static_cast<size_t>(INT32_MAX)) {
    throw std::invalid_argument(where + ": too many tensors");
  }
  for (size_t t = 0; t < entries.size(); ++t) {
    const MTEntry& e = entries[t];
    const std::string idx = "[" + std::to_string(t) + "]";
    if (e.n < 0) throw std::invalid_argument(where + ": size" + idx + " must be >= 0");
    for (int b = 0; b < kMTMaxBuffers; ++b) {
      const int code = e.dtype[b];
      if (code != kFloat32 && code != kBFloat16) {
        throw std::invalid_argument(where + ": " + names[b] + idx + " dtype code " +
                                    std::to_string(code) +
                                    " is not 0 (float32) or 1 (bfloat16)");
      }
      if (e.n > 0 && e.ptr[b] == nullptr) {
        throw std::invalid_argument(where + ": " + names[b] + idx + " pointer is null");
      }
    }
    if (first_fp32_only && e.dtype[0] != kFloat32) {
      throw std::invalid_argument(where + ": " + names[0] + idx + " must be float32");
    }
  }
}

inline void check_moments_multi_args(const MomentsMultiArgs& a) {
  static const char* const names[kMTMaxBuffers] = {"R", "M", "V", "N"};
  check_multi_entries("adam_moments_multi", a.entries,
                      a.table != nullptr ? a.entries.size() : a.scalars.size(), names, true);
  for (size_t t = 0; t < a.entries.size(); ++t) {
    if (a.entries[t].dtype[1] != a.entries[t].dtype[2]) {
      throw std::invalid_argument("adam_moments_multi: M[" + std::to_string(t) + "] and V[" +
                                  std::to_string(t) + "] must have one dtype");
    }
  }
}

inline void check_adamw_multi_args(const AdamWMultiArgs& a) {
  static const char* const names[kMTMaxBuffers] = {"W", "G", "M", "V"};
  check_multi_entries("adamw_step_multi", a.entries,
                      a.table != nullptr ? a.entries.size() : a.scalars.size(), names, false);
  for (size_t t = 0; t < a.entries.size(); ++t) {
    if (a.entries[t].dtype[2] != a.entries[t].dtype[3]) {
      throw std::invalid_argument("adamw_step_multi: M[" + std::to_string(t) + "] and V[" +
                                  std::to_string(t) + "] must have one dtype");
    }
  }
}

// CPU twins (csrc/cpu/multi_tensor.cpp). num_threads <= 0: OpenMP's default.
void adam_moments_multi_cpu(const MomentsMultiArgs& a, int num_threads);
void adamw_step_multi_cpu(const AdamWMultiArgs& a, int num_threads);

}  // namespace lowrank_fused
