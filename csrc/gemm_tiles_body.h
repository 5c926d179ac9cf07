// The tile kernels' body, included twice by gemm_tiles.cpp: once with Tiles = EmulatedTiles
// compiled for any x86-64 (namespace emulated), once with Tiles = AmxTiles under the AMX +
// AVX-512 target (namespace hardware), so that one text serves both and the OpenMP regions it
// opens are compiled for the right ISA. No include guard, no includes: gemm_tiles.cpp provides
// them and the packed operands (PackedBf16, PackedQ8) before each inclusion.

// ---- BF16 weights ------------------------------------------------------------------------------
// NB weight tiles (the A operands, from wp: a piece of weights packed by pack_piece, step by step)
// times one tile of x (hi and lo, the B operands) over k steps ks0 .. ks1 - 1, added to
// c[0 .. NB - 1] (16 n x 16 m fp32 each; zeros when `first`).
// Tiles: 0 .. 2 accumulators; 3 .. 5 weights; 6, 7 hi and lo of x: 2 NB dot products for NB + 2
// loads a step (the tile unit, not the loads, sets the pace from NB = 3).
template <int NB>
inline void bf16_block(const PackedBf16& xp, const uint16_t* wp, int64_t mt, int64_t ks0,
                       int64_t ks1, bool first, float (*c)[16][16]) {
  constexpr int64_t kStepElems = kTileRows * 32;  // one B tile: 16 pairs x 16 columns x 2
  if (first) {
    Tiles::template zero<0>();
    if constexpr (NB > 1) Tiles::template zero<1>();
    if constexpr (NB > 2) Tiles::template zero<2>();
  } else {
    Tiles::template load<0>(c[0], kTileBytes);
    if constexpr (NB > 1) Tiles::template load<1>(c[1], kTileBytes);
    if constexpr (NB > 2) Tiles::template load<2>(c[2], kTileBytes);
  }
  const uint16_t* hi = xp.hi.data() + mt * xp.k_steps * kStepElems;
  const uint16_t* lo = xp.lo.data() + mt * xp.k_steps * kStepElems;
  for (int64_t ks = ks0; ks < ks1; ++ks, wp += NB * kStepElems) {
    Tiles::template load<6>(hi + ks * kStepElems, kTileBytes);
    Tiles::template load<7>(lo + ks * kStepElems, kTileBytes);
    Tiles::template load<3>(wp, kTileBytes);
    Tiles::template dpbf16ps<0, 3, 6>();
    Tiles::template dpbf16ps<0, 3, 7>();
    if constexpr (NB > 1) {
      Tiles::template load<4>(wp + kStepElems, kTileBytes);
      Tiles::template dpbf16ps<1, 4, 6>();
      Tiles::template dpbf16ps<1, 4, 7>();
    }
    if constexpr (NB > 2) {
      Tiles::template load<5>(wp + 2 * kStepElems, kTileBytes);
      Tiles::template dpbf16ps<2, 5, 6>();
      Tiles::template dpbf16ps<2, 5, 7>();
    }
  }
  Tiles::template store<0>(c[0], kTileBytes);
  if constexpr (NB > 1) Tiles::template store<1>(c[1], kTileBytes);
  if constexpr (NB > 2) Tiles::template store<2>(c[2], kTileBytes);
}

// Weight rows n0 .. n0 + 16 nb - 1, k steps k0 .. k1 - 1, copied to wp as
// [step][tile][16 rows][32]:
// read in place, tiles of rows 2K bytes apart alias in L1 when K is a power of two (4 KiB apart:
// one cache set), and the piece would not stay there while the x tiles pass.
inline void pack_piece(const uint16_t* w, int64_t K, int64_t n0, int nb, int64_t k0, int64_t k1,
                       uint16_t* wp) {
  for (int64_t ks = k0; ks < k1; ++ks)
    for (int r = 0; r < nb * kTileRows; ++r, wp += 32)
      std::memcpy(wp, w + (n0 + r) * K + ks * 32, 64);
}

// out rows m of tile mt that exist (< M), columns n0 .. n0 + 15, from c (16 n x 16 m)
inline void write_tile(const float (*c)[16], int64_t mt, int64_t n0, const float* bias, float* out,
                       int64_t M, int64_t N) {
  for (int64_t j = 0, m = mt * 16; j < 16 && m < M; ++j, ++m)
    for (int i = 0; i < kTileRows; ++i)
      out[m * N + n0 + i] = c[i][j] + (bias ? bias[n0 + i] : 0.0f);
}

// Blocking (x packed once, pack_bf16): each thread takes a contiguous range of n blocks (3 weight
// tiles, 48 rows) and walks, per group of up to 8 x tiles (128 rows), K in pieces of kChunk steps
// (48 rows x 256 k of weights = 24 KiB: they stay in L1 while every x tile of the group passes),
// inside spans of K whose x (hi + lo) fits L2 (kSpanBytes): the accumulators of a thread's n blocks
// wait in its scratch between spans, so x comes from L2 and each weight from memory once per group.
constexpr int64_t kChunkSteps = 8;             // k steps (of 32) per L1-resident weight piece
constexpr int64_t kGroupTiles = 8;              // x tiles (of 16 rows) per pass over the weights
constexpr int64_t kSpanBytes = int64_t(1) << 20;  // x (hi + lo) per span, for L2

void gemm_bf16(const float* x, const uint16_t* w, const float* bias, float* out, int64_t M,
               int64_t N, int64_t K) {
  const PackedBf16 xp = pack_bf16(x, M, K);
  const int64_t n_tiles = N / kTileRows, n_blocks = (n_tiles + 2) / 3;
  const int threads = num_threads();
  const bool pool = threads > 1 && n_blocks > 1 && N * K >= kTileParallelMinElems;
  const int64_t group_tiles = std::min(kGroupTiles, xp.m_tiles);
  const int64_t step_bytes = group_tiles * kTileRows * 32 * 2 * 2;  // x hi + lo, one k step
  const int64_t span = std::max<int64_t>(kChunkSteps, kSpanBytes / step_bytes / kChunkSteps *
                                                          kChunkSteps);
#pragma omp parallel num_threads(threads) if (pool)
  {
    const int t = omp_get_thread_num(), nt_ = omp_get_num_threads();
    const int64_t b0 = n_blocks * t / nt_, b1 = n_blocks * (t + 1) / nt_;
    Tiles::begin();
    // accumulators for one group of x tiles: [n block][x tile][3][16][16], every block of the
    // thread's while K takes several spans, one block's otherwise (written out at once)
    const bool spans = span < xp.k_steps;
    LineAligned<float> allocator;
    const size_t floats = size_t((spans ? b1 - b0 : 1) * group_tiles * 768);
    float* scratch = allocator.allocate(floats);
    alignas(64) uint16_t piece[kChunkSteps * 3 * kTileRows * 32];  // 24 KiB of weights
    auto acc = [&](int64_t b, int64_t g) {
      return reinterpret_cast<float(*)[16][16]>(scratch +
                                                 ((spans ? b - b0 : 0) * group_tiles + g) * 768);
    };
    for (int64_t mg = 0; mg < xp.m_tiles; mg += group_tiles) {
      const int64_t g_end = std::min(xp.m_tiles, mg + group_tiles);
      for (int64_t s0 = 0; s0 < xp.k_steps; s0 += span) {
        const int64_t s1 = std::min(xp.k_steps, s0 + span);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t n0 = b * 3 * kTileRows;
          const int nb = int(std::min<int64_t>(3, n_tiles - b * 3));
          for (int64_t k0 = s0; k0 < s1; k0 += kChunkSteps) {
            const int64_t k1 = std::min(s1, k0 + kChunkSteps);
            pack_piece(w, K, n0, nb, k0, k1, piece);
            for (int64_t mt = mg; mt < g_end; ++mt) {
              float(*c)[16][16] = acc(b, mt - mg);
              if (nb == 3) bf16_block<3>(xp, piece, mt, k0, k1, k0 == 0, c);
              else if (nb == 2) bf16_block<2>(xp, piece, mt, k0, k1, k0 == 0, c);
              else bf16_block<1>(xp, piece, mt, k0, k1, k0 == 0, c);
            }
          }
          if (s1 == xp.k_steps)  // the block's sums are whole: out
            for (int64_t mt = mg; mt < g_end; ++mt)
              for (int i = 0; i < nb; ++i)
                write_tile(acc(b, mt - mg)[i], mt, n0 + i * kTileRows, bias, out, M, N);
        }
      }
    }
    allocator.deallocate(scratch, floats);
    Tiles::end();
  }
}

// ---- INT8 / INT4 weights on int8 activations ---------------------------------------------------
// Weight rows n0 .. n0 + 15 times MT tiles of x (rows of tile mt0 + t), every block:
//   per unit u:  C = sum over its 64-byte chunks of A (16 rows x 64 u8 weights) . B (x, VNNI)
//                in_block[n][m] += C[n][m] * sx[m, u]
//   per block b: acc[n][m] += s[n, b] * (in_block[n][m] - zp[n, b] * c[m, b])
// the scalar reference's formula (gemv_nbits_vnni.cpp), in fp32, on rows of 16 lanes (columns m:
// GCC's vector types, whatever the target). A comes from `rows` (stride `stride` bytes: the
// weights in place for INT8, their nibbles unpacked for INT4).
// Tiles: 0, 1 accumulators (int32), 2 weights, 4, 5 x: two independent dot products a unit.
using Lanes = float __attribute__((vector_size(64)));
using IntLanes = int32_t __attribute__((vector_size(64)));

inline Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int BITS, int MT>
inline void q8_block(const PackedQ8& xp, const NBits& w, const uint8_t* rows, int64_t stride,
                     const float (*s)[kTileRows], const float (*zp)[kTileRows], int64_t mt0,
                     Lanes (*acc)[kTileRows]) {
  constexpr int chunks_per_unit = BITS == 8 ? 1 : 2;
  const int64_t per_block = w.block_size / xp.unit;
  const int64_t x_tile = xp.chunks * (kTileRows * kTileBytes);
  const int8_t* xq = xp.q.data() + mt0 * x_tile;
  alignas(64) IntLanes c[MT][kTileRows];
  Lanes in_block[MT][kTileRows];
  for (int t = 0; t < MT; ++t)
    for (int i = 0; i < kTileRows; ++i) acc[t][i] = Lanes{};
  for (int64_t b = 0, u = 0; b < w.k_blocks; ++b) {
    for (int t = 0; t < MT; ++t)
      for (int i = 0; i < kTileRows; ++i) in_block[t][i] = Lanes{};
    for (int64_t end = u + per_block; u < end; ++u) {
      Tiles::template zero<0>();
      if constexpr (MT == 2) Tiles::template zero<1>();
      for (int64_t ch = u * chunks_per_unit; ch < (u + 1) * chunks_per_unit; ++ch) {
        Tiles::template load<2>(rows + ch * kTileBytes, stride);
        Tiles::template load<4>(xq + ch * (kTileRows * kTileBytes), kTileBytes);
        Tiles::template dpbusd<0, 2, 4>();
        if constexpr (MT == 2) {
          Tiles::template load<5>(xq + x_tile + ch * (kTileRows * kTileBytes), kTileBytes);
          Tiles::template dpbusd<1, 2, 5>();
        }
      }
      Tiles::template store<0>(c[0], kTileBytes);
      if constexpr (MT == 2) Tiles::template store<1>(c[1], kTileBytes);
      for (int t = 0; t < MT; ++t) {
        const Lanes sx = load_lanes(xp.scale.data() + ((mt0 + t) * xp.units + u) * 16);
        for (int i = 0; i < kTileRows; ++i)
          in_block[t][i] += __builtin_convertvector(c[t][i], Lanes) * sx;
      }
    }
    for (int t = 0; t < MT; ++t) {
      const Lanes cx = load_lanes(xp.c.data() + ((mt0 + t) * w.k_blocks + b) * 16);
      for (int i = 0; i < kTileRows; ++i) acc[t][i] += s[b][i] * (in_block[t][i] - zp[b][i] * cx);
    }
  }
}

// INT4: rows n0 .. n0 + 15 with each unit's 64 bytes split into its low nibbles (the unit's even
// elements, which pair with x's first chunk) and high nibbles (odd elements, second chunk)
inline void unpack_int4(const NBits& w, int64_t n0, int64_t padded, uint8_t* rows) {
  for (int i = 0; i < kTileRows; ++i) {
    const uint8_t* q = w.row(n0 + i).q;
    uint8_t* r = rows + i * padded;
    for (int64_t unit = 0; unit < padded / 128; ++unit, q += 64, r += 128)
      for (int at = 0; at < 64; ++at) {
        r[at] = q[at] & 0xF;
        r[64 + at] = q[at] >> 4;
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
    std::vector<float> s(size_t(w.k_blocks * kTileRows)), zp(s.size());  // [block][row]
    const auto* s_b = reinterpret_cast<const float(*)[kTileRows]>(s.data());
    const auto* zp_b = reinterpret_cast<const float(*)[kTileRows]>(zp.data());
    Lanes acc[2][kTileRows];
#pragma omp for schedule(dynamic, 1)
    for (int64_t nt = 0; nt < n_tiles; ++nt) {
      const int64_t n0 = nt * kTileRows;
      for (int i = 0; i < kTileRows; ++i) {
        const Row row = w.row(n0 + i);
        for (int64_t b = 0; b < w.k_blocks; ++b) {
          s[b * kTileRows + i] = row.s[b];
          zp[b * kTileRows + i] = zero_point<BITS>(row, b);
        }
      }
      const uint8_t* rows = w.row(n0).q;  // INT8: the weights in place, rows padded bytes apart
      if constexpr (BITS == 4) {
        unpack_int4(w, n0, qx.padded, unpacked.data());
        asm volatile("" ::: "memory");  // tileloadd's asm names no memory input: stores first
        rows = unpacked.data();
      }
      for (int64_t mt = 0; mt < xp.m_tiles; mt += 2) {
        const int mts = mt + 2 <= xp.m_tiles ? 2 : 1;
        if (mts == 2) q8_block<BITS, 2>(xp, w, rows, qx.padded, s_b, zp_b, mt, acc);
        else q8_block<BITS, 1>(xp, w, rows, qx.padded, s_b, zp_b, mt, acc);
        for (int t = 0; t < mts; ++t)
          write_tile(reinterpret_cast<const float(*)[16]>(acc[t]), mt + t, n0, bias, out, M, N);
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
