// The BF16-weight kernels on vdpbf16ps, written once against a dot-product unit `Dp` (dpbf16.h):
// gemm_dpbf16.cpp includes this file twice, in namespace emulated (Dp = EmulatedDp, any CPU) and
// in namespace hardware (Dp = HardwareDp, compiled for AVX512_BF16). Both do the same operations
// in the same order, so their results are equal bit for bit; keep it so (no a * b + c here: the
// hardware build may fuse it, the emulated one not).
//
// Operands, shared by both (gemm_dpbf16.cpp): x (M, K) fp32 as XHiLo (hi, lo: (M, Kp) bf16,
// Kp = K rounded up to 32, zeros past K); w (N, K) bf16 as stored; out (M, N) fp32.

// ---- decode: a few rows of x, weights streamed once --------------------------------------------

// One weight row w (K) times MB rows of x into out[m * N], m < MB. Lane i of an accumulator
// sums the pairs i of every 32-column step; hi and lo have their own accumulators. The row is read
// front to back with a software prefetch 4 KiB ahead: a thread's share of w is one linear stream
// (see gemv.cpp's row_avx512).
template <int MB>
void row(const uint16_t* hi, const uint16_t* lo, int64_t Kp, const uint16_t* w, int64_t K,
         const float* bias, float* out, int64_t N) {
  using F32 = typename Dp::F32;
  using Bf16 = typename Dp::Bf16;
  F32 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = Dp::zero();
  const char* ahead = reinterpret_cast<const char*>(w) + kDpPrefetchBytes;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    Dp::prefetch(ahead + 2 * k);  // the two 64-byte lines of w this step's successor reads
    Dp::prefetch(ahead + 2 * k + 64);
    const Bf16 w0 = Dp::load(w + k), w1 = Dp::load(w + k + 32);
    for (int m = 0; m < MB; ++m) {
      acc[m][0] = Dp::dp(acc[m][0], Dp::load(hi + m * Kp + k), w0);
      acc[m][1] = Dp::dp(acc[m][1], Dp::load(lo + m * Kp + k), w0);
      acc[m][2] = Dp::dp(acc[m][2], Dp::load(hi + m * Kp + k + 32), w1);
      acc[m][3] = Dp::dp(acc[m][3], Dp::load(lo + m * Kp + k + 32), w1);
    }
  }
  for (; k < K; k += 32) {  // x is zero past K; w is read only up to K
    const Bf16 wv = K - k >= 32 ? Dp::load(w + k) : Dp::load_first(w + k, int(K - k));
    for (int m = 0; m < MB; ++m) {
      acc[m][0] = Dp::dp(acc[m][0], Dp::load(hi + m * Kp + k), wv);
      acc[m][1] = Dp::dp(acc[m][1], Dp::load(lo + m * Kp + k), wv);
    }
  }
  for (int m = 0; m < MB; ++m) {
    const F32 sum = Dp::add(Dp::add(acc[m][0], acc[m][2]), Dp::add(acc[m][1], acc[m][3]));
    out[m * N] = Dp::sum(sum) + (bias ? bias[0] : 0.0f);
  }
}

// out (M, N) = x w^T + bias for M of a few rows: each thread streams a run of kDpRows-row blocks
// of w (threads.h Runs), and each block meets every row of x, up to 4 at a time.
inline void gemv(const XHiLo& x, const uint16_t* w, const float* bias, float* out, int64_t M,
                 int64_t N, int64_t K) {
  using RowFn = void (*)(const uint16_t*, const uint16_t*, int64_t, const uint16_t*, int64_t,
                         const float*, float*, int64_t);
  static constexpr RowFn rows[4] = {row<1>, row<2>, row<3>, row<4>};
  const int threads = num_threads();
  const int64_t blocks = (N + kDpRows - 1) / kDpRows;
  const bool parallel = threads > 1 && N > kDpRows && N * K >= kDpParallelMinElems;
  // runs (threads.h) taken in grains of 2^18 weights, but at least 4 a thread: SmolLM2's 576 x 576
  // is 1.3 such grains
  const int64_t grain =
      std::max<int64_t>(1, std::min<int64_t>(chunk_tasks(kDpRows * K), blocks / (4 * threads)));
  for_runs(blocks, threads, grain, parallel, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n1 = std::min<int64_t>(N, (b + 1) * kDpRows);
      x_row_chunks(M, 4, [&](int64_t m0, int mb) {
        for (int64_t n = b * kDpRows; n < n1; ++n)
          rows[mb - 1](x.hi.data() + m0 * x.Kp, x.lo.data() + m0 * x.Kp, x.Kp, w + n * K, K,
                       bias ? bias + n : nullptr, out + m0 * N + n, N);
      });
    }
  });
}

// ---- prompt: many rows of x, a register-blocked GEMM --------------------------------------------

// The weights of kPanelCols output columns n0 .. n0 + cols - 1 rearranged for dp, pair by pair:
//   panel[p][j] = the 32-bit word (w[n0 + j][2p], w[n0 + j][2p + 1]), p < pairs, j < kPanelCols;
// zeros for j >= cols and k >= K.
void pack_panel(const uint16_t* w, int64_t cols, int64_t K, int64_t pairs, uint32_t* panel);

// out[m][c] for m < MR, c < 16 (NV - 1) + last: MR rows of x (hi and lo: pairs, stride xs words)
// times the panel's first 16 NV columns over all pairs, plus bias (when not null). Lanes are
// output columns: x's pair is broadcast, the panel's pairs are read whole. The whole of K in one
// pass: blocks of 32 .. 256 pairs (the panel's block in L1) measured slower (M = 128, one thread,
// 2048 x 2048: 45 .. 57 GFLOP/s against 58; 11264 x 2048: 43 .. 55 against 60).
template <int MR, int NV>
void tile(const uint32_t* hi, const uint32_t* lo, int64_t xs, const uint32_t* panel,
          int64_t pairs, float* out, int64_t N, int last, const float* bias) {
  using F32 = typename Dp::F32;
  using Bf16 = typename Dp::Bf16;
  F32 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = Dp::zero();
  for (int64_t p = 0; p < pairs; ++p) {
    Bf16 wv[NV];
    for (int v = 0; v < NV; ++v)
      wv[v] = Dp::load(reinterpret_cast<const uint16_t*>(panel + p * kPanelCols + 16 * v));
    for (int m = 0; m < MR; ++m) {
      const Bf16 h = Dp::broadcast_pair(hi + m * xs + p);
      for (int v = 0; v < NV; ++v) acc[m][v] = Dp::dp(acc[m][v], h, wv[v]);
      const Bf16 l = Dp::broadcast_pair(lo + m * xs + p);
      for (int v = 0; v < NV; ++v) acc[m][v] = Dp::dp(acc[m][v], l, wv[v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) {
      const int n = v < NV - 1 ? 16 : last;
      const F32 sum = bias ? Dp::add(acc[m][v], Dp::load_f32(bias + 16 * v, n)) : acc[m][v];
      Dp::store_f32(out + m * N + 16 * v, sum, n);
    }
}

// out (M, N) = x w^T + bias: threads take panels of kPanelCols columns (w's rows), pack each
// once, and run it against every kMR rows of x.
inline void gemm(const XHiLo& x, const uint16_t* w, const float* bias, float* out, int64_t M,
                 int64_t N, int64_t K) {
  using TileFn = void (*)(const uint32_t*, const uint32_t*, int64_t, const uint32_t*, int64_t,
                          float*, int64_t, int, const float*);
  static constexpr TileFn tiles[kMR][4] = {
      {tile<1, 1>, tile<1, 2>, tile<1, 3>, tile<1, 4>},
      {tile<2, 1>, tile<2, 2>, tile<2, 3>, tile<2, 4>},
      {tile<3, 1>, tile<3, 2>, tile<3, 3>, tile<3, 4>},
      {tile<4, 1>, tile<4, 2>, tile<4, 3>, tile<4, 4>},
      {tile<5, 1>, tile<5, 2>, tile<5, 3>, tile<5, 4>},
      {tile<6, 1>, tile<6, 2>, tile<6, 3>, tile<6, 4>},
  };
  static_assert(kMR == 6 && kPanelCols == 64, "the table above lists kMR x kPanelCols / 16 tiles");
  const int64_t pairs = (K + 1) / 2, xs = x.Kp / 2;
  const uint32_t* hi = reinterpret_cast<const uint32_t*>(x.hi.data());
  const uint32_t* lo = reinterpret_cast<const uint32_t*>(x.lo.data());
  const int64_t panels = (N + kPanelCols - 1) / kPanelCols;
  const int threads = num_threads();
  const bool parallel = threads > 1 && panels > 1;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    std::vector<uint32_t, LineAligned<uint32_t>>& panel = panel_scratch();
    panel.resize(size_t(pairs * kPanelCols));
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < panels; ++t) {
      const int64_t n0 = t * kPanelCols, cols = std::min<int64_t>(kPanelCols, N - n0);
      const int nv = int((cols + 15) / 16), last = int(cols - 16 * (nv - 1));
      pack_panel(w + n0 * K, cols, K, pairs, panel.data());
      for (int64_t m0 = 0; m0 < M; m0 += kMR) {
        const int mr = int(std::min<int64_t>(kMR, M - m0));
        tiles[mr - 1][nv - 1](hi + m0 * xs, lo + m0 * xs, xs, panel.data(), pairs,
                              out + m0 * N + n0, N, last, bias ? bias + n0 : nullptr);
      }
    }
  }
}
