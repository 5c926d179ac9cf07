// The tile kernels' body, included twice by gemm_tiles.cpp: once with Tiles = EmulatedTiles
// compiled for any x86-64 (namespace emulated), once with Tiles = AmxTiles under the AMX +
// AVX-512 target (namespace hardware), so that one text serves both and the OpenMP regions it
// opens are compiled for the right ISA. No include guard, no includes: gemm_tiles.cpp provides
// them and the packed operands (PackedBf16, PackedQ8) before each inclusion.

// ---- BF16 weights ------------------------------------------------------------------------------
// Weight rows n0 .. n0 + 15 (the A operand: 32 bf16 of each per k step, read in place from w,
// stride 2K) times MT tiles of x (hi and lo, B operands) -> ct[t] (16 n x 16 m fp32).
// Tiles: 0, 1 accumulators; 2 weights; 4, 5 hi and lo of x's first tile; 6, 7 of its second.
template <int MT>
inline void bf16_block(const PackedBf16& xp, const uint16_t* w, int64_t n0, int64_t mt0,
                       int64_t K, float (*ct)[kTileRows][16]) {
  constexpr int64_t kStepElems = kTileRows * 32;  // one B tile: 16 pairs x 16 columns x 2
  Tiles::template zero<0>();
  if constexpr (MT == 2) Tiles::template zero<1>();
  const uint16_t* hi = xp.hi.data() + mt0 * xp.k_steps * kStepElems;
  const uint16_t* lo = xp.lo.data() + mt0 * xp.k_steps * kStepElems;
  const int64_t next = xp.k_steps * kStepElems;  // the next tile of x
  for (int64_t ks = 0; ks < xp.k_steps; ++ks) {
    Tiles::template load<2>(w + n0 * K + ks * 32, 2 * K);
    Tiles::template load<4>(hi + ks * kStepElems, kTileBytes);
    Tiles::template load<5>(lo + ks * kStepElems, kTileBytes);
    Tiles::template dpbf16ps<0, 2, 4>();
    Tiles::template dpbf16ps<0, 2, 5>();
    if constexpr (MT == 2) {
      Tiles::template load<6>(hi + next + ks * kStepElems, kTileBytes);
      Tiles::template load<7>(lo + next + ks * kStepElems, kTileBytes);
      Tiles::template dpbf16ps<1, 2, 6>();
      Tiles::template dpbf16ps<1, 2, 7>();
    }
  }
  Tiles::template store<0>(ct[0], kTileBytes);
  if constexpr (MT == 2) Tiles::template store<1>(ct[1], kTileBytes);
}

// out rows m of the tiles mt0 .. mt0 + MT - 1 that exist (< M), columns n0 .. n0 + 15
inline void write_tiles(float (*ct)[kTileRows][16], int mt_count, int64_t mt0, int64_t n0,
                        const float* bias, float* out, int64_t M, int64_t N) {
  for (int t = 0; t < mt_count; ++t)
    for (int64_t j = 0, m = (mt0 + t) * 16; j < 16 && m < M; ++j, ++m)
      for (int i = 0; i < kTileRows; ++i)
        out[m * N + n0 + i] = ct[t][i][j] + (bias ? bias[n0 + i] : 0.0f);
}

void gemm_bf16(const float* x, const uint16_t* w, const float* bias, float* out, int64_t M,
               int64_t N, int64_t K) {
  const PackedBf16 xp = pack_bf16(x, M, K);
  const int64_t n_tiles = N / kTileRows;
  const int threads = num_threads();
  const bool pool = threads > 1 && n_tiles > 1 && N * K >= kTileParallelMinElems;
#pragma omp parallel num_threads(threads) if (pool)
  {
    Tiles::begin();
    alignas(64) float ct[2][kTileRows][16];
#pragma omp for schedule(dynamic, 1)
    for (int64_t nt = 0; nt < n_tiles; ++nt) {
      for (int64_t mt = 0; mt < xp.m_tiles; mt += 2) {
        const int mt_count = mt + 2 <= xp.m_tiles ? 2 : 1;
        if (mt_count == 2) bf16_block<2>(xp, w, nt * kTileRows, mt, K, ct);
        else bf16_block<1>(xp, w, nt * kTileRows, mt, K, ct);
        write_tiles(ct, mt_count, mt, nt * kTileRows, bias, out, M, N);
      }
    }
    Tiles::end();
  }
}

// ---- INT8 / INT4 weights on int8 activations ---------------------------------------------------
// Weight rows n0 .. n0 + 15 times one tile of x (rows m0 .. m0 + 15), every block:
//   per unit u:  C = sum over its 64-byte chunks of A (16 rows x 64 u8 weights) . B (x, VNNI)
//                in_block[n][m] += C[n][m] * sx[m, u]
//   per block b: acc[n][m] += s[n, b] * (in_block[n][m] - zp[n, b] * c[m, b])
// the scalar reference's formula (gemv_nbits_vnni.cpp), in fp32. A comes from `rows` (stride
// `stride` bytes: the weights in place for INT8, their nibbles unpacked for INT4).
// Tiles: 0 accumulator (int32), 2 weights, 4 x.
template <int BITS>
inline void q8_block(const PackedQ8& xp, const NBits& w, const uint8_t* rows, int64_t stride,
                     int64_t n0, int64_t mt, float (*acc)[16]) {
  constexpr int chunks_per_unit = BITS == 8 ? 1 : 2;
  const int64_t per_block = w.block_size / xp.unit;
  const int8_t* xq = xp.q.data() + mt * xp.chunks * (kTileRows * kTileBytes);
  alignas(64) int32_t c[kTileRows][16];
  float in_block[kTileRows][16];
  for (int i = 0; i < kTileRows; ++i)
    for (int j = 0; j < 16; ++j) acc[i][j] = 0.0f;
  for (int64_t b = 0, u = 0; b < w.k_blocks; ++b) {
    for (int i = 0; i < kTileRows; ++i)
      for (int j = 0; j < 16; ++j) in_block[i][j] = 0.0f;
    for (int64_t end = u + per_block; u < end; ++u) {
      Tiles::template zero<0>();
      for (int64_t ch = u * chunks_per_unit; ch < (u + 1) * chunks_per_unit; ++ch) {
        Tiles::template load<2>(rows + ch * kTileBytes, stride);
        Tiles::template load<4>(xq + ch * (kTileRows * kTileBytes), kTileBytes);
        Tiles::template dpbusd<0, 2, 4>();
      }
      Tiles::template store<0>(c, kTileBytes);
      const float* sx = xp.scale.data() + (mt * xp.units + u) * 16;
      for (int i = 0; i < kTileRows; ++i)
        for (int j = 0; j < 16; ++j) in_block[i][j] += float(c[i][j]) * sx[j];
    }
    const float* cx = xp.c.data() + (mt * w.k_blocks + b) * 16;
    for (int i = 0; i < kTileRows; ++i) {
      const Row row = w.row(n0 + i);
      const float s = row.s[b], zp = zero_point<BITS>(row, b);
      for (int j = 0; j < 16; ++j) acc[i][j] += s * (in_block[i][j] - zp * cx[j]);
    }
  }
}

// INT4: rows n0 .. n0 + 15 with each unit's 64 bytes split into its low nibbles (the unit's even
// elements, which pair with x's first chunk) and high nibbles (odd elements, second chunk)
inline void unpack_int4(const NBits& w, int64_t n0, int64_t padded, uint8_t* rows) {
  for (int i = 0; i < kTileRows; ++i) {
    const uint8_t* q = w.row(n0 + i).q;
    uint8_t* r = rows + i * padded;
    for (int64_t byte = 0; byte < padded / 2; ++byte) {
      const int64_t unit = byte / 64, at = byte % 64;
      r[unit * 128 + at] = q[byte] & 0xF;
      r[unit * 128 + 64 + at] = q[byte] >> 4;
    }
  }
}

template <int BITS>
void gemm_nbits_q8_bits(const QuantizedX& qx, const NBits& w, const float* bias, float* out,
                        int64_t M, int64_t N) {
  const PackedQ8 xp = pack_q8(qx, M);
  const int64_t n_tiles = N / kTileRows;
  const int threads = num_threads();
  const bool pool = threads > 1 && n_tiles > 1 && N * qx.padded >= kTileParallelMinElems;
#pragma omp parallel num_threads(threads) if (pool)
  {
    Tiles::begin();
    std::vector<uint8_t, LineAligned<uint8_t>> unpacked(BITS == 4 ? kTileRows * qx.padded : 0);
    alignas(64) float acc[kTileRows][16];
#pragma omp for schedule(dynamic, 1)
    for (int64_t nt = 0; nt < n_tiles; ++nt) {
      const int64_t n0 = nt * kTileRows;
      const uint8_t* rows = w.row(n0).q;  // INT8: the weights in place, rows padded bytes apart
      if constexpr (BITS == 4) {
        unpack_int4(w, n0, qx.padded, unpacked.data());
        asm volatile("" ::: "memory");  // tileloadd's asm names no memory input: stores first
        rows = unpacked.data();
      }
      for (int64_t mt = 0; mt < xp.m_tiles; ++mt) {
        q8_block<BITS>(xp, w, rows, qx.padded, n0, mt, acc);
        for (int64_t j = 0, m = mt * 16; j < 16 && m < M; ++j, ++m)
          for (int i = 0; i < kTileRows; ++i)
            out[m * N + n0 + i] = acc[i][j] + (bias ? bias[n0 + i] : 0.0f);
      }
    }
    Tiles::end();
  }
}

void gemm_nbits_q8(const QuantizedX& qx, const NBits& w, int bits, const float* bias, float* out,
                   int64_t M, int64_t N) {
  if (bits == 8) gemm_nbits_q8_bits<8>(qx, w, bias, out, M, N);
  else gemm_nbits_q8_bits<4>(qx, w, bias, out, M, N);
}
