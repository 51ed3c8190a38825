// Batched inverse Cholesky factor of small SPD matrices: the k x k part of CholeskyQR2 for the
// batched subspace refresh (docs/bytes.md, "Kernel-design notes"). For every matrix b of the batch:
//
//   L L^T = Gram_b (lower Cholesky, only the lower triangle of Gram_b is read)
//   Linv_b = L^{-1} (lower triangular; upper triangle written as zeros)
//   ok_b = 1 when every pivot is finite and > 0 and min L_ii > pivot_ratio_tol * max L_ii;
//          else ok_b = 0 and Linv_b = I (the caller falls back to Householder QR).
//
// Sums are accumulated in double; results rounded to fp32. One routine, shared by the CPU twin
// (csrc/cpu/small_cholesky.cpp) and the CUDA kernel (csrc/cuda/small_cholesky.cu: one thread
// per matrix; k is small, a few dozen to a few hundred). No torch or CUDA header.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define LF_SC_HD __host__ __device__ __forceinline__
#else
#define LF_SC_HD inline
#endif

namespace lowrank_fused {

struct SmallCholeskyArgs {
  const float* gram = nullptr;  // (batch, k, k), contiguous
  float* linv = nullptr;        // (batch, k, k), contiguous, distinct from gram
  int32_t* ok = nullptr;        // (batch,)
  int64_t batch = 0;
  int64_t k = 0;
  double pivot_ratio_tol = 0.0;
};

inline void check_small_cholesky_args(const SmallCholeskyArgs& a) {
  if (a.batch < 0 || a.k < 0) throw std::invalid_argument("small_cholesky_inverse: negative size");
  if (a.batch > 0 && a.k > 0 && (!a.gram || !a.linv || !a.ok))
    throw std::invalid_argument("small_cholesky_inverse: null pointer");
  if (a.gram == a.linv && a.batch * a.k > 0)
    throw std::invalid_argument("small_cholesky_inverse: gram and linv must be distinct buffers");
  if (!(a.pivot_ratio_tol >= 0.0))
    throw std::invalid_argument("small_cholesky_inverse: pivot_ratio_tol must be >= 0");
}

// One matrix: A (k x k, read), X (k x k, written). Returns 1 when ok.
LF_SC_HD int small_cholesky_inverse_one(const float* A, float* X, int64_t k, double tol) {
  // Cholesky in X (lower triangle), right-looking by columns, double accumulation
  int good = 1;
  double dmax = 0.0, dmin = 0.0;
  for (int64_t j = 0; j < k && good; ++j) {
    double s = A[j * k + j];
    for (int64_t p = 0; p < j; ++p) {
      const double l = X[j * k + p];
      s -= l * l;
    }
    if (!(s > 0.0) || !(s < INFINITY)) {
      good = 0;
      break;
    }
    const double d = sqrt(s);
    X[j * k + j] = static_cast<float>(d);
    if (j == 0 || d > dmax) dmax = d;
    if (j == 0 || d < dmin) dmin = d;
    for (int64_t i = j + 1; i < k; ++i) {
      double t = A[i * k + j];
      for (int64_t p = 0; p < j; ++p) t -= static_cast<double>(X[i * k + p]) * X[j * k + p];
      X[i * k + j] = static_cast<float>(t / d);
    }
  }
  if (good && k > 0 && !(dmin > tol * dmax)) good = 0;
  if (good) {
    // in-place inverse of the lower-triangular X (LAPACK trti2 order: last column first)
    for (int64_t j = k - 1; j >= 0; --j) {
      const double inv = 1.0 / static_cast<double>(X[j * k + j]);
      X[j * k + j] = static_cast<float>(inv);
      // x = X[j+1:, j] <- -inv * Xinv[j+1:, j+1:] @ x, bottom row first (x_p, p < i, still old)
      for (int64_t i = k - 1; i > j; --i) {
        double t = 0.0;
        for (int64_t p = j + 1; p <= i; ++p) t += static_cast<double>(X[i * k + p]) * X[p * k + j];
        X[i * k + j] = static_cast<float>(-inv * t);
      }
    }
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t c = i + 1; c < k; ++c) X[i * k + c] = 0.0f;
      for (int64_t c = 0; c <= i; ++c)
        if (!(fabs(X[i * k + c]) < INFINITY)) good = 0;
    }
  }
  if (!good) {
    for (int64_t i = 0; i < k; ++i)
      for (int64_t c = 0; c < k; ++c) X[i * k + c] = (i == c) ? 1.0f : 0.0f;
  }
  return good;
}

void small_cholesky_inverse_cpu(const SmallCholeskyArgs& a, int num_threads);

}  // namespace lowrank_fused
