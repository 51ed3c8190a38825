// pybind11 module lowrank_fused._C. No torch headers: tensors cross as raw pointers
// (tensor.data_ptr()), element counts, dtype codes, Python floats and, for CUDA, the device
// index and the cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream).
// Importing the module never touches the CUDA runtime.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "adamw_step.h"
#include "multi_tensor.h"
#include "small_cholesky.h"
#include "cpu/elementwise.h"
#if defined(LOWRANK_FUSED_WITH_CUDA)
#include "cuda/launchers.h"
#endif

#ifndef LOWRANK_FUSED_CUDA_ARCHS
#define LOWRANK_FUSED_CUDA_ARCHS ""
#endif
#ifndef LOWRANK_FUSED_NO_CUDA_REASON
#define LOWRANK_FUSED_NO_CUDA_REASON "built without CUDA"
#endif

namespace py = pybind11;
using namespace lowrank_fused;

namespace {

AdamWArgs make_args(std::uintptr_t w, std::uintptr_t g, std::uintptr_t m, std::uintptr_t v,
                    int64_t n, int w_dtype, int g_dtype, int mv_dtype, double lr, double beta1,
                    double beta2, double eps, double c1, double c2, double pre_scale,
                    double post_decay) {
  AdamWArgs a;
  a.w = reinterpret_cast<void*>(w);
  a.g = reinterpret_cast<const void*>(g);
  a.m = reinterpret_cast<void*>(m);
  a.v = reinterpret_cast<void*>(v);
  a.n = n;
  a.w_dtype = w_dtype;
  a.g_dtype = g_dtype;
  a.mv_dtype = mv_dtype;
  a.s = make_scalars(lr, beta1, beta2, eps, c1, c2, pre_scale, post_decay);
  return a;
}

SmallCholeskyArgs make_chol_args(std::uintptr_t gram, std::uintptr_t linv, std::uintptr_t ok,
                                 int64_t batch, int64_t k, double tol) {
  SmallCholeskyArgs a;
  a.gram = reinterpret_cast<const float*>(gram);
  a.linv = reinterpret_cast<float*>(linv);
  a.ok = reinterpret_cast<int32_t*>(ok);
  a.batch = batch;
  a.k = k;
  a.pivot_ratio_tol = tol;
  return a;
}

// The entries of a multi-tensor call from flat lists: ptrs and dtypes hold 4 per tensor (the
// four buffers of tensor t at 4t..4t+3), sizes one per tensor.
std::vector<MTEntry> make_entries(const char* op, const std::vector<std::uintptr_t>& ptrs,
                                  const std::vector<int64_t>& sizes,
                                  const std::vector<int>& dtypes) {
  const size_t T = sizes.size();
  if (ptrs.size() != kMTMaxBuffers * T || dtypes.size() != kMTMaxBuffers * T) {
    throw std::invalid_argument(std::string(op) + ": ptrs and dtypes must hold 4 entries per "
                                "tensor (" + std::to_string(T) + " tensors), got " +
                                std::to_string(ptrs.size()) + " and " +
                                std::to_string(dtypes.size()));
  }
  std::vector<MTEntry> entries(T);
  for (size_t t = 0; t < T; ++t) {
    for (int b = 0; b < kMTMaxBuffers; ++b) {
      entries[t].ptr[b] = reinterpret_cast<void*>(ptrs[kMTMaxBuffers * t + b]);
      entries[t].dtype[b] = dtypes[kMTMaxBuffers * t + b];
    }
    entries[t].n = sizes[t];
  }
  return entries;
}

void check_lengths(const char* op, size_t T,
                   std::initializer_list<std::pair<const char*, size_t>> lists) {
  for (const auto& kv : lists) {
    if (kv.second != T) {
      throw std::invalid_argument(std::string(op) + ": " + kv.first + " must hold one value per "
                                  "tensor (" + std::to_string(T) + "), got " +
                                  std::to_string(kv.second));
    }
  }
}

MomentsMultiArgs make_moments_multi(const std::vector<std::uintptr_t>& ptrs,
                                    const std::vector<int64_t>& sizes,
                                    const std::vector<int>& dtypes,
                                    const std::vector<double>& beta1,
                                    const std::vector<double>& beta2,
                                    const std::vector<double>& eps, const std::vector<double>& c1,
                                    const std::vector<double>& c2, std::uintptr_t norms,
                                    std::uintptr_t flag, std::uintptr_t skip,
                                    std::uintptr_t table) {
  const char* op = "adam_moments_multi";
  MomentsMultiArgs a;
  a.entries = make_entries(op, ptrs, sizes, dtypes);
  const size_t T = sizes.size();
  a.table = reinterpret_cast<const float*>(table);
  if (table == 0) {  // else the scalars come from the table (multi_tensor.h)
    check_lengths(op, T, {{"beta1", beta1.size()}, {"beta2", beta2.size()},
                          {"eps", eps.size()}, {"c1", c1.size()}, {"c2", c2.size()}});
    for (size_t t = 0; t < T; ++t) {
      a.scalars.push_back(make_moments_scalars(beta1[t], beta2[t], eps[t], c1[t], c2[t]));
    }
  }
  a.norms = reinterpret_cast<float*>(norms);
  a.flag = reinterpret_cast<int32_t*>(flag);
  a.skip = reinterpret_cast<const uint8_t*>(skip);
  check_moments_multi_args(a);
  return a;
}

AdamWMultiArgs make_adamw_multi(const std::vector<std::uintptr_t>& ptrs,
                                const std::vector<int64_t>& sizes,
                                const std::vector<int>& dtypes, const std::vector<double>& lr,
                                const std::vector<double>& beta1,
                                const std::vector<double>& beta2,
                                const std::vector<double>& eps, const std::vector<double>& c1,
                                const std::vector<double>& c2,
                                const std::vector<double>& pre_scale,
                                const std::vector<double>& post_decay, std::uintptr_t flag,
                                std::uintptr_t skip, std::uintptr_t table) {
  const char* op = "adamw_step_multi";
  AdamWMultiArgs a;
  a.entries = make_entries(op, ptrs, sizes, dtypes);
  const size_t T = sizes.size();
  a.table = reinterpret_cast<const float*>(table);
  if (table == 0) {  // else the scalars come from the table (multi_tensor.h)
    check_lengths(op, T, {{"lr", lr.size()}, {"beta1", beta1.size()}, {"beta2", beta2.size()},
                          {"eps", eps.size()}, {"c1", c1.size()}, {"c2", c2.size()},
                          {"pre_scale", pre_scale.size()}, {"post_decay", post_decay.size()}});
    for (size_t t = 0; t < T; ++t) {
      a.scalars.push_back(make_scalars(lr[t], beta1[t], beta2[t], eps[t], c1[t], c2[t],
                                       pre_scale[t], post_decay[t]));
    }
  }
  a.flag = reinterpret_cast<int32_t*>(flag);
  a.skip = reinterpret_cast<const uint8_t*>(skip);
  check_adamw_multi_args(a);
  return a;
}

bool has_openmp() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "lowrank_fused compiled kernels (CPU twins, and CUDA kernels when built with nvcc)";
  mod.attr("DTYPE_FLOAT32") = int(kFloat32);
  mod.attr("DTYPE_BFLOAT16") = int(kBFloat16);

  mod.def("has_cuda", []() {
#if defined(LOWRANK_FUSED_WITH_CUDA)
    return true;
#else
    return false;
#endif
  }, "True when the module was compiled with its CUDA kernels.");

  mod.def("cuda_runtime_status", []() -> std::string {
#if defined(LOWRANK_FUSED_WITH_CUDA)
    py::gil_scoped_release nogil;
    return cuda_runtime_status();
#else
    return std::string("lowrank_fused._C was ") + LOWRANK_FUSED_NO_CUDA_REASON;
#endif
  }, "'ok' when the CUDA runtime linked into the module sees a device, else why not.");

  mod.def("build_info", []() {
    py::dict d;
#if defined(LOWRANK_FUSED_WITH_CUDA)
    d["cuda"] = true;
    d["cuda_archs"] = std::string(LOWRANK_FUSED_CUDA_ARCHS);
    d["cudart_version"] = cuda_runtime_version();
    d["no_cuda_reason"] = py::none();
#else
    d["cuda"] = false;
    d["cuda_archs"] = std::string();
    d["cudart_version"] = 0;
    d["no_cuda_reason"] = std::string(LOWRANK_FUSED_NO_CUDA_REASON);
#endif
    d["openmp"] = has_openmp();
    return d;
  }, "How the module was built: cuda, cuda_archs, cudart_version, no_cuda_reason, openmp.");

#if defined(LOWRANK_FUSED_WITH_CUDA)
  mod.def("cuda_driver_version", []() {
    py::gil_scoped_release nogil;
    return cuda_driver_version();
  }, "The CUDA driver's version (cudaDriverGetVersion), 0 when there is no driver.");
#endif

  mod.def(
      "adamw_step_cpu",
      [](std::uintptr_t w, std::uintptr_t g, std::uintptr_t m, std::uintptr_t v, int64_t n,
         int w_dtype, int g_dtype, int mv_dtype, double lr, double beta1, double beta2,
         double eps, double c1, double c2, double pre_scale, double post_decay,
         std::uintptr_t skip, int num_threads) {
        AdamWArgs a = make_args(w, g, m, v, n, w_dtype, g_dtype, mv_dtype, lr, beta1, beta2,
                                eps, c1, c2, pre_scale, post_decay);
        a.skip = reinterpret_cast<const uint8_t*>(skip);
        check_args(a);  // throws (ValueError) with the GIL still held
        py::gil_scoped_release nogil;
        adamw_step_cpu(a, num_threads);
      },
      py::arg("w"), py::arg("g"), py::arg("m"), py::arg("v"), py::arg("n"), py::arg("w_dtype"),
      py::arg("g_dtype"), py::arg("mv_dtype"), py::kw_only(), py::arg("lr"), py::arg("beta1"),
      py::arg("beta2"), py::arg("eps"), py::arg("c1"), py::arg("c2"), py::arg("pre_scale"),
      py::arg("post_decay"), py::arg("skip") = 0, py::arg("num_threads") = 0,
      "AdamW step in place on contiguous host buffers of n elements (pointers as integers); "
      "`skip`: a one-byte bool, or 0 for none, that when true leaves every buffer as it is.");

  mod.def(
      "adamw_step_cuda",
      [](std::uintptr_t w, std::uintptr_t g, std::uintptr_t m, std::uintptr_t v, int64_t n,
         int w_dtype, int g_dtype, int mv_dtype, double lr, double beta1, double beta2,
         double eps, double c1, double c2, double pre_scale, double post_decay,
         std::uintptr_t skip, int device, std::uintptr_t stream) {
#if defined(LOWRANK_FUSED_WITH_CUDA)
        AdamWArgs a = make_args(w, g, m, v, n, w_dtype, g_dtype, mv_dtype, lr, beta1, beta2,
                                eps, c1, c2, pre_scale, post_decay);
        a.skip = reinterpret_cast<const uint8_t*>(skip);
        check_args(a);
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = adamw_step_cuda(a, device, stream);
        }
        if (!err.empty()) throw std::runtime_error(err);
#else
        (void)w; (void)g; (void)m; (void)v; (void)n; (void)w_dtype; (void)g_dtype;
        (void)mv_dtype; (void)lr; (void)beta1; (void)beta2; (void)eps; (void)c1; (void)c2;
        (void)pre_scale; (void)post_decay; (void)skip; (void)device; (void)stream;
        throw std::runtime_error(std::string("adamw_step_cuda: lowrank_fused._C was ") +
                                 LOWRANK_FUSED_NO_CUDA_REASON);
#endif
      },
      py::arg("w"), py::arg("g"), py::arg("m"), py::arg("v"), py::arg("n"), py::arg("w_dtype"),
      py::arg("g_dtype"), py::arg("mv_dtype"), py::kw_only(), py::arg("lr"), py::arg("beta1"),
      py::arg("beta2"), py::arg("eps"), py::arg("c1"), py::arg("c2"), py::arg("pre_scale"),
      py::arg("post_decay"), py::arg("skip") = 0, py::arg("device"), py::arg("stream"),
      "AdamW step in place on contiguous device buffers, launched on `stream` of `device` "
      "(`skip`: a device bool the kernel reads, or 0); "
      "raises RuntimeError with the CUDA error (asynchronous: errors inside the kernel show "
      "up at the next synchronisation).");

  mod.def(
      "small_cholesky_inverse_cpu",
      [](std::uintptr_t gram, std::uintptr_t linv, std::uintptr_t ok, int64_t batch, int64_t k,
         double pivot_ratio_tol, int num_threads) {
        SmallCholeskyArgs a = make_chol_args(gram, linv, ok, batch, k, pivot_ratio_tol);
        check_small_cholesky_args(a);
        py::gil_scoped_release nogil;
        small_cholesky_inverse_cpu(a, num_threads);
      },
      py::arg("gram"), py::arg("linv"), py::arg("ok"), py::arg("batch"), py::arg("k"),
      py::kw_only(), py::arg("pivot_ratio_tol"), py::arg("num_threads") = 0,
      "Batched inverse Cholesky factors of fp32 (batch, k, k) SPD matrices on host buffers.");

  mod.def(
      "small_cholesky_inverse_cuda",
      [](std::uintptr_t gram, std::uintptr_t linv, std::uintptr_t ok, int64_t batch, int64_t k,
         double pivot_ratio_tol, int device, std::uintptr_t stream) {
#if defined(LOWRANK_FUSED_WITH_CUDA)
        SmallCholeskyArgs a = make_chol_args(gram, linv, ok, batch, k, pivot_ratio_tol);
        check_small_cholesky_args(a);
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = small_cholesky_inverse_cuda(a, device, stream);
        }
        if (!err.empty()) throw std::runtime_error(err);
#else
        (void)gram; (void)linv; (void)ok; (void)batch; (void)k; (void)pivot_ratio_tol;
        (void)device; (void)stream;
        throw std::runtime_error(std::string("small_cholesky_inverse_cuda: lowrank_fused._C was ") +
                                 LOWRANK_FUSED_NO_CUDA_REASON);
#endif
      },
      py::arg("gram"), py::arg("linv"), py::arg("ok"), py::arg("batch"), py::arg("k"),
      py::kw_only(), py::arg("pivot_ratio_tol"), py::arg("device"), py::arg("stream"),
      "Batched inverse Cholesky factors on device buffers, launched on `stream` of `device`.");

  // -- multi-tensor ops (multi_tensor.h): ptrs/dtypes 4 per tensor, sizes and scalars 1 per
  // tensor; norms/flag/skip are pointers, 0 for none. The flag is only ever set to 1; a skip
  // flag (one bool, read by the kernels) that holds true leaves everything else unwritten.
  mod.def(
      "adam_moments_multi_cpu",
      [](const std::vector<std::uintptr_t>& ptrs, const std::vector<int64_t>& sizes,
         const std::vector<int>& dtypes, const std::vector<double>& beta1,
         const std::vector<double>& beta2, const std::vector<double>& eps,
         const std::vector<double>& c1, const std::vector<double>& c2, std::uintptr_t norms,
         std::uintptr_t flag, std::uintptr_t skip, std::uintptr_t table, int num_threads) {
        MomentsMultiArgs a = make_moments_multi(ptrs, sizes, dtypes, beta1, beta2, eps, c1, c2,
                                                norms, flag, skip, table);
        py::gil_scoped_release nogil;
        adam_moments_multi_cpu(a, num_threads);
      },
      py::arg("ptrs"), py::arg("sizes"), py::arg("dtypes"), py::kw_only(), py::arg("beta1"),
      py::arg("beta2"), py::arg("eps"), py::arg("c1"), py::arg("c2"), py::arg("norms") = 0,
      py::arg("flag") = 0, py::arg("skip") = 0, py::arg("table") = 0, py::arg("num_threads") = 0,
      "K2 moments of many tensors (R, M, V, N per tensor) in one OpenMP loop, on host buffers.");

  mod.def(
      "adam_moments_multi_cuda",
      [](const std::vector<std::uintptr_t>& ptrs, const std::vector<int64_t>& sizes,
         const std::vector<int>& dtypes, const std::vector<double>& beta1,
         const std::vector<double>& beta2, const std::vector<double>& eps,
         const std::vector<double>& c1, const std::vector<double>& c2, std::uintptr_t norms,
         std::uintptr_t flag, std::uintptr_t skip, std::uintptr_t table, int device,
         std::uintptr_t stream) {
        MomentsMultiArgs a = make_moments_multi(ptrs, sizes, dtypes, beta1, beta2, eps, c1, c2,
                                                norms, flag, skip, table);
#if defined(LOWRANK_FUSED_WITH_CUDA)
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = adam_moments_multi_cuda(a, device, stream);
        }
        if (!err.empty()) throw std::runtime_error(err);
#else
        (void)a; (void)device; (void)stream;
        throw std::runtime_error(std::string("adam_moments_multi_cuda: lowrank_fused._C was ") +
                                 LOWRANK_FUSED_NO_CUDA_REASON);
#endif
      },
      py::arg("ptrs"), py::arg("sizes"), py::arg("dtypes"), py::kw_only(), py::arg("beta1"),
      py::arg("beta2"), py::arg("eps"), py::arg("c1"), py::arg("c2"), py::arg("norms") = 0,
      py::arg("flag") = 0, py::arg("skip") = 0, py::arg("table") = 0, py::arg("device"),
      py::arg("stream"),
      "K2 moments of many tensors in ONE kernel launch on `stream` of `device`.");

  mod.def(
      "adamw_step_multi_cpu",
      [](const std::vector<std::uintptr_t>& ptrs, const std::vector<int64_t>& sizes,
         const std::vector<int>& dtypes, const std::vector<double>& lr,
         const std::vector<double>& beta1, const std::vector<double>& beta2,
         const std::vector<double>& eps, const std::vector<double>& c1,
         const std::vector<double>& c2, const std::vector<double>& pre_scale,
         const std::vector<double>& post_decay, std::uintptr_t flag, std::uintptr_t skip,
         std::uintptr_t table, int num_threads) {
        AdamWMultiArgs a = make_adamw_multi(ptrs, sizes, dtypes, lr, beta1, beta2, eps, c1, c2,
                                            pre_scale, post_decay, flag, skip, table);
        py::gil_scoped_release nogil;
        adamw_step_multi_cpu(a, num_threads);
      },
      py::arg("ptrs"), py::arg("sizes"), py::arg("dtypes"), py::kw_only(), py::arg("lr"),
      py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("c1"), py::arg("c2"),
      py::arg("pre_scale"), py::arg("post_decay"), py::arg("flag") = 0, py::arg("skip") = 0,
      py::arg("table") = 0, py::arg("num_threads") = 0,
      "AdamW step of many tensors (W, G, M, V per tensor) in one OpenMP loop, on host buffers.");

  mod.def(
      "nonfinite_flag_cpu",
      [](const std::vector<std::uintptr_t>& ptrs, const std::vector<int64_t>& sizes,
         const std::vector<int>& dtypes, int num_threads) {
        const size_t T = sizes.size();
        if (ptrs.size() != T || dtypes.size() != T) {
          throw std::invalid_argument("nonfinite_flag_cpu: ptrs and dtypes must hold one entry "
                                      "per tensor (" + std::to_string(T) + "), got " +
                                      std::to_string(ptrs.size()) + " and " +
                                      std::to_string(dtypes.size()));
        }
        std::vector<const void*> p(T);
        for (size_t t = 0; t < T; ++t) {
          if (dtypes[t] < 0 || dtypes[t] > cpu::kFloat64Code) {
            throw std::invalid_argument("nonfinite_flag_cpu: dtype code [" + std::to_string(t) +
                                        "] " + std::to_string(dtypes[t]) + " is not 0..3 "
                                        "(float32, bfloat16, float16, float64)");
          }
          if (sizes[t] < 0) {
            throw std::invalid_argument("nonfinite_flag_cpu: size[" + std::to_string(t) +
                                        "] must be >= 0");
          }
          if (sizes[t] > 0 && ptrs[t] == 0) {
            throw std::invalid_argument("nonfinite_flag_cpu: pointer [" + std::to_string(t) +
                                        "] is null");
          }
          p[t] = reinterpret_cast<const void*>(ptrs[t]);
        }
        py::gil_scoped_release nogil;
        return nonfinite_multi_cpu(p, sizes, dtypes, num_threads);
      },
      py::arg("ptrs"), py::arg("sizes"), py::arg("dtypes"), py::kw_only(),
      py::arg("num_threads") = 0,
      "Whether host buffers (one pointer, size and dtype code 0 float32, 1 bfloat16, "
      "2 float16, 3 float64 per tensor) hold a NaN or an infinity.");

  // per-tensor flags: the checks of nonfinite_flag_cpu, shared by both backends
  auto flag_inputs = [](const char* op, const std::vector<std::uintptr_t>& ptrs,
                        const std::vector<int64_t>& sizes, const std::vector<int>& dtypes,
                        std::uintptr_t flags) {
    const size_t T = sizes.size();
    const std::string name(op);
    if (ptrs.size() != T || dtypes.size() != T) {
      throw std::invalid_argument(name + ": ptrs and dtypes must hold one entry per tensor (" +
                                  std::to_string(T) + "), got " + std::to_string(ptrs.size()) +
                                  " and " + std::to_string(dtypes.size()));
    }
    if (flags == 0) throw std::invalid_argument(name + ": flags pointer is null");
    std::vector<const void*> p(T);
    for (size_t t = 0; t < T; ++t) {
      if (dtypes[t] < 0 || dtypes[t] > cpu::kFloat64Code) {
        throw std::invalid_argument(name + ": dtype code [" + std::to_string(t) + "] " +
                                    std::to_string(dtypes[t]) + " is not 0..3 (float32, "
                                    "bfloat16, float16, float64)");
      }
      if (sizes[t] < 0) {
        throw std::invalid_argument(name + ": size[" + std::to_string(t) + "] must be >= 0");
      }
      if (sizes[t] > 0 && ptrs[t] == 0) {
        throw std::invalid_argument(name + ": pointer [" + std::to_string(t) + "] is null");
      }
      p[t] = reinterpret_cast<const void*>(ptrs[t]);
    }
    return p;
  };

  mod.def(
      "nonfinite_flags_multi_cpu",
      [flag_inputs](const std::vector<std::uintptr_t>& ptrs, const std::vector<int64_t>& sizes,
                    const std::vector<int>& dtypes, std::uintptr_t flags, int num_threads) {
        std::vector<const void*> p =
            flag_inputs("nonfinite_flags_multi_cpu", ptrs, sizes, dtypes, flags);
        py::gil_scoped_release nogil;
        nonfinite_flags_multi_cpu(p, sizes, dtypes, reinterpret_cast<uint8_t*>(flags),
                                  num_threads);
      },
      py::arg("ptrs"), py::arg("sizes"), py::arg("dtypes"), py::kw_only(), py::arg("flags"),
      py::arg("num_threads") = 0,
      "Per-tensor non-finite flags of host buffers into `flags` (len(ptrs) + 1 bytes: one per "
      "tensor, then whether any is set).");

  mod.def(
      "nonfinite_flags_multi_cuda",
      [flag_inputs](const std::vector<std::uintptr_t>& ptrs, const std::vector<int64_t>& sizes,
                    const std::vector<int>& dtypes, std::uintptr_t flags, int device,
                    std::uintptr_t stream) {
        std::vector<const void*> p =
            flag_inputs("nonfinite_flags_multi_cuda", ptrs, sizes, dtypes, flags);
#if defined(LOWRANK_FUSED_WITH_CUDA)
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = nonfinite_flags_multi_cuda(p, sizes, dtypes, reinterpret_cast<uint8_t*>(flags),
                                           device, stream);
        }
        if (!err.empty()) throw std::runtime_error(err);
#else
        (void)p; (void)device; (void)stream;
        throw std::runtime_error(std::string("nonfinite_flags_multi_cuda: lowrank_fused._C "
                                             "was ") + LOWRANK_FUSED_NO_CUDA_REASON);
#endif
      },
      py::arg("ptrs"), py::arg("sizes"), py::arg("dtypes"), py::kw_only(), py::arg("flags"),
      py::arg("device"), py::arg("stream"),
      "Per-tensor non-finite flags of device buffers into `flags` (device bytes) in ONE "
      "kernel launch on `stream` of `device`; nothing is read back.");

  mod.def("cpu_isa", []() { return std::string(cpu::isa_name()); },
          "The instruction set the CPU twins' loops run with: avx512, avx2 or baseline.");
  mod.def("cpu_isas", []() {
        int count = 0;
        const char* const* names = cpu::supported_isas(&count);
        std::vector<std::string> out(names, names + count);
        return out;
      },
      "The instruction sets this CPU can run the CPU twins' loops with, widest first.");
  mod.def("set_cpu_isa", [](const std::string& name) {
        return std::string(cpu::set_isa(name.c_str()));
      },
      py::arg("name"),
      "Runs the CPU twins' loops with `name` (one of cpu_isas(); for tests and benchmarks); "
      "returns the previous one.");

  mod.def(
      "adamw_step_multi_cuda",
      [](const std::vector<std::uintptr_t>& ptrs, const std::vector<int64_t>& sizes,
         const std::vector<int>& dtypes, const std::vector<double>& lr,
         const std::vector<double>& beta1, const std::vector<double>& beta2,
         const std::vector<double>& eps, const std::vector<double>& c1,
         const std::vector<double>& c2, const std::vector<double>& pre_scale,
         const std::vector<double>& post_decay, std::uintptr_t flag, std::uintptr_t skip,
         std::uintptr_t table, int device, std::uintptr_t stream) {
        AdamWMultiArgs a = make_adamw_multi(ptrs, sizes, dtypes, lr, beta1, beta2, eps, c1, c2,
                                            pre_scale, post_decay, flag, skip, table);
#if defined(LOWRANK_FUSED_WITH_CUDA)
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = adamw_step_multi_cuda(a, device, stream);
        }
        if (!err.empty()) throw std::runtime_error(err);
#else
        (void)a; (void)device; (void)stream;
        throw std::runtime_error(std::string("adamw_step_multi_cuda: lowrank_fused._C was ") +
                                 LOWRANK_FUSED_NO_CUDA_REASON);
#endif
      },
      py::arg("ptrs"), py::arg("sizes"), py::arg("dtypes"), py::kw_only(), py::arg("lr"),
      py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("c1"), py::arg("c2"),
      py::arg("pre_scale"), py::arg("post_decay"), py::arg("flag") = 0, py::arg("skip") = 0,
      py::arg("table") = 0, py::arg("device"), py::arg("stream"),
      "AdamW step of many tensors in ONE kernel launch on `stream` of `device`.");
}
