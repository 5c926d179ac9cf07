// Entry points of the csrc kernels, as bound in module.cpp. Pointers are raw addresses (a tensor's
// data_ptr()); shapes are element counts; all tensors are contiguous, row-major.
#pragma once

#include <cstdint>

#include "nbits.h"  // ZeroPoints

namespace xcompile {

// x (rows, cols) fp32, weight (cols) fp32, out (rows, cols) fp32 (may alias x).
// out = x * rsqrt(mean(x^2) + eps) * weight, per row (transformers' LlamaRMSNorm).
void rmsnorm(const float* x, const float* weight, float* out, int64_t rows, int64_t cols, float eps);

// x, skip (rows, cols) fp32, weight (cols), out and sum_out (rows, cols) fp32.
// sum_out = x + skip; out = rmsnorm(sum_out) * weight (com.microsoft
// SkipSimplifiedLayerNormalization without bias). sum_out may alias x or skip; out may alias x or
// skip but not sum_out.
void skip_rmsnorm(const float* x, const float* skip, const float* weight, float* out,
                  float* sum_out, int64_t rows, int64_t cols, float eps);

// x (tokens, heads, head_dim) fp32 with token stride x_stride, out likewise with out_stride
// (out may be x); cos, sin (tokens, rotary_dim / 2). Rotates the first rotary_dim dims of every
// head: pairs (i, i + rotary_dim / 2) when !interleaved (Llama), (2i, 2i + 1) when interleaved
// (GPT-J); the rest pass through. positions (tokens) int64, or null: token t takes row
// positions[t] of cos, sin (then whole tables, (max_positions, rotary_dim / 2)), else row t.
void rotary(const float* x, const float* cos, const float* sin, float* out, int64_t tokens,
            int64_t heads, int64_t head_dim, int64_t rotary_dim, bool interleaved,
            int64_t x_stride, int64_t out_stride, const int64_t* positions = nullptr);

// gate, up, out (n) fp32: out = gate * sigmoid(gate) * up. out may alias gate or up.
void silu_mul(const float* gate, const float* up, float* out, int64_t n);
// The same on rows: gate (rows, cols) and up with row strides gate_stride, up_stride (column
// slices of a fused gate/up projection's output), out (rows, cols) contiguous.
void silu_mul_rows(const float* gate, const float* up, float* out, int64_t rows, int64_t cols,
                   int64_t gate_stride, int64_t up_stride);

// The same with GELU (tanh form) for the gate: out = gelu_tanh(gate) * up (GeGLU).
void gelu_mul_rows(const float* gate, const float* up, float* out, int64_t rows, int64_t cols,
                   int64_t gate_stride, int64_t up_stride);

// x, out (n) fp32: out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). out may alias x.
void gelu_tanh(const float* x, float* out, int64_t n);

// x, out (n) fp32: out = erf(x) (csrc/erf.cpp). out may alias x.
void erf_f32(const float* x, float* out, int64_t n);

// New K or V into the cache (csrc/kv_write.cpp): src (S, kv_heads, d) fp32 with token stride
// src_stride (a column slice of a fused QKV output, say) -> cache (slots, kv_heads, capacity, d)
// at slot `slot`, positions start .. start + S - 1. kv_write_bf16: the cache is bf16 (raw uint16
// bits), each value rounded to nearest even.
void kv_write(const float* src, int64_t src_stride, float* cache, int64_t slot, int64_t start,
              int64_t S, int64_t kv_heads, int64_t head_dim, int64_t capacity);
void kv_write_bf16(const float* src, int64_t src_stride, uint16_t* cache, int64_t slot,
                   int64_t start, int64_t S, int64_t kv_heads, int64_t head_dim, int64_t capacity);

// q (S, heads, d), k_cache and v_cache (kv_heads, capacity, d) with rows 0 .. past + S - 1 valid,
// out (S, heads, d) (may be q), all fp32 (csrc/attention.cpp). Causal GQA: query t (position
// past + t), head h attends to keys max(0, past + t - window + 1) .. past + t of KV head
// h / (heads / kv_heads) (window <= 0: from 0), softmax(scale * q . k) @ v; softcap > 0: each
// score s becomes softcap * tanh(s / softcap) before the softmax.
// slot_of (past + S int32) or null: key j is read from the cache slot slot_of[j], slot_stride
// floats apart (k_cache, v_cache then point at slot 0): beam search's indirect access.
void attention(const float* q, const float* k_cache, const float* v_cache, float* out, int64_t S,
               int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t capacity, int64_t past,
               int64_t window, float scale, const int32_t* slot_of = nullptr,
               int64_t slot_stride = 0, float softcap = 0.0f);
// Decode's split over keys (csrc/attention.cpp) on (the default) or off: off only for benchmarks
// and tests that hold the split to the one-pass path.
void set_attention_split(bool enabled);
// The same over a bf16 cache (raw uint16 bits; slot_stride in elements), widened to fp32 as read.
void attention_bf16(const float* q, const uint16_t* k_cache, const uint16_t* v_cache, float* out,
                    int64_t S, int64_t heads, int64_t kv_heads, int64_t head_dim,
                    int64_t capacity, int64_t past, int64_t window, float scale,
                    const int32_t* slot_of = nullptr, int64_t slot_stride = 0,
                    float softcap = 0.0f);

// x (M, K) fp32, w (N, K) fp32 (nn.Linear layout), bias (N) fp32 or null, out (M, N) fp32.
// out[m, n] = sum_k x[m, k] * w[n, k] + bias[n]
void gemv_f32(const float* x, const float* w, const float* bias, float* out, int64_t M, int64_t N,
              int64_t K);

// Same with w (N, K) bf16 (raw uint16 bits); fp32 accumulation.
void gemv_bf16(const float* x, const uint16_t* w, const float* bias, float* out, int64_t M,
               int64_t N, int64_t K);

// Weight-only INT8 / INT4 in ONNX Runtime's com.microsoft MatMulNBits layout (csrc/gemv_nbits.cpp):
//   B (N, k_blocks, block_size * bits / 8) uint8, k_blocks = ceil(K / block_size); INT4 element 2j
//   of a block in the low nibble of byte j, 2j + 1 in the high one. scales (N, k_blocks) fp32 or
//   fp16 (nbits.h, BlockFloats); float zero points likewise.
//   zero_points (nbits.h): packed uint8, INT8 (N, k_blocks), INT4 (N, ceil(k_blocks / 2)) with
//   block 2j in the low nibble; or fp32 (N, k_blocks) like scales; or none (2^(bits-1)).
//   bits 4 or 8; block_size a power of two >= 16.
//   W[n, k] = (q[n, k] - zp[n, k / block_size]) * scales[n, k / block_size], in fp32:
//   (float(q) - zp) * scale, exact in the subtraction for integer zero points.
// gemv_nbits: x (M, K) fp32, bias (N) fp32 or null, out (M, N) = x @ W.T + bias, fp32.
void gemv_nbits(const float* x, const uint8_t* B, BlockFloats scales, ZeroPoints zero_points,
                const float* bias, float* out, int64_t M, int64_t N, int64_t K, int bits,
                int64_t block_size);
// gemv_nbits_q8: the same on int8-quantized activations (csrc/gemv_nbits_vnni.cpp; MatMulNBits'
// accuracy_level 4): AVX512_VNNI where the CPU has it, else a plain scalar reference.
// Every block size (>= 16) since the small blocks' kernel (gemv_nbits_vnni_small.cpp):
// gemv_nbits_q8_supported says so.
bool gemv_nbits_q8_supported(int bits, int64_t block_size);
void gemv_nbits_q8(const float* x, const uint8_t* B, BlockFloats scales,
                   ZeroPoints zero_points, const float* bias, float* out, int64_t M, int64_t N,
                   int64_t K, int bits, int64_t block_size);
// gemm_nbits_vnni (csrc/gemm_nbits_vnni.cpp): gemv_nbits_q8 for prompts (x of kGemmMinRows rows
// and more) on AVX512_VNNI, weights repacked a panel of columns at a time; gemv_nbits_q8 takes
// it by itself there. gemm_nbits_vnni_supported: this CPU's path has it, for these blocks.
constexpr int64_t kGemmMinRows = 16;
bool gemm_nbits_vnni_supported(int bits, int64_t block_size);
void gemm_nbits_vnni(const float* x, const uint8_t* B, BlockFloats scales,
                     ZeroPoints zero_points, const float* bias, float* out, int64_t M, int64_t N,
                     int64_t K, int bits, int64_t block_size);
// dequantize_nbits: out (N, K) fp32 = W, bit for bit the reference's (float(q) - zp) * scale.
void dequantize_nbits(const uint8_t* B, BlockFloats scales, ZeroPoints zero_points, float* out,
                      int64_t N, int64_t K, int bits, int64_t block_size);
// gather_nbits (csrc/gather_nbits.cpp): out (count, K) fp32 = rows indices[i] of W, an embedding
// lookup on a quantized table; indices (count) int64, negative ones counted from N, those outside
// [-N, N) give zero rows.
void gather_nbits(const uint8_t* B, BlockFloats scales, ZeroPoints zero_points,
                  const int64_t* indices, float* out, int64_t count, int64_t N, int64_t K,
                  int bits, int64_t block_size);

// Prefill matmuls on AMX tiles (csrc/gemm_tiles.cpp), meant for x of 16 rows and more; the same
// operands and results as gemv_bf16 / gemv_nbits_q8 (BF16: x carried as two bf16, so within fp32
// tolerances, not bit for bit). N a multiple of 16, BF16 K a multiple of 32. emulate: run on the
// C++ model of the tile unit (any CPU; the tests), else on the AMX unit (throws
// std::invalid_argument where this CPU or its OS has none). gemv_bf16 and gemv_nbits_q8 take
// these themselves when the current ISA is amx and x has 16 rows or more.
bool gemm_bf16_tiles_supported(int64_t N, int64_t K);
void gemm_bf16_tiles(const float* x, const uint16_t* w, const float* bias, float* out, int64_t M,
                     int64_t N, int64_t K, bool emulate);
void gemm_nbits_q8_tiles(const float* x, const uint8_t* B, BlockFloats scales,
                         ZeroPoints zero_points, const float* bias, float* out, int64_t M,
                         int64_t N, int64_t K, int bits, int64_t block_size, bool emulate);

// BF16-weight matmuls on vdpbf16ps (csrc/gemm_dpbf16.cpp): the same operands and results as
// gemv_bf16 (x carried as two bf16, so within fp32 tolerances, not bit for bit). gemv_bf16_dp
// streams the weights once (decode, a few rows of x); gemm_bf16_dp is the prompt's GEMM (8 rows
// of x and more), any N and K. emulate: run on the C++ model of the instruction (any CPU; the
// tests), else on AVX512_BF16 (throws std::invalid_argument where this CPU has none). gemv_bf16
// takes them itself when the current ISA is avx512_bf16 or amx.
// dpbf16ps: one vdpbf16ps (dpbf16.h) on acc (16 fp32), a and b (32 bf16 each) into out (16 fp32).
void dpbf16ps(const float* acc, const uint16_t* a, const uint16_t* b, float* out, bool emulate);
void gemv_bf16_dp(const float* x, const uint16_t* w, const float* bias, float* out, int64_t M,
                  int64_t N, int64_t K, bool emulate);
void gemm_bf16_dp(const float* x, const uint16_t* w, const float* bias, float* out, int64_t M,
                  int64_t N, int64_t K, bool emulate);

}  // namespace xcompile
