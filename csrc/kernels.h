// Entry points of the csrc kernels, as bound in module.cpp. Pointers are raw addresses (a tensor's
// data_ptr()); shapes are element counts; all tensors are contiguous, row-major.
#pragma once

#include <cstdint>

namespace xcompile {

// x (rows, cols) fp32, weight (cols) fp32, out (rows, cols) fp32 (may alias x).
// out = x * rsqrt(mean(x^2) + eps) * weight, per row (transformers' LlamaRMSNorm).
void rmsnorm(const float* x, const float* weight, float* out, int64_t rows, int64_t cols, float eps);

// x (M, K) fp32, w (N, K) fp32 (nn.Linear layout), bias (N) fp32 or null, out (M, N) fp32.
// out[m, n] = sum_k x[m, k] * w[n, k] + bias[n]
void gemv_f32(const float* x, const float* w, const float* bias, float* out, int64_t M, int64_t N,
              int64_t K);

// Same with w (N, K) bf16 (raw uint16 bits); fp32 accumulation.
void gemv_bf16(const float* x, const uint16_t* w, const float* bias, float* out, int64_t M,
               int64_t N, int64_t K);

}  // namespace xcompile
