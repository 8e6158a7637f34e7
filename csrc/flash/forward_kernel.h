// Flash-attention forward (FlashAttention-2 scheme): a block of warps owns 16 query rows per warp of one
// (sequence, head) and streams 64-key tiles of K and V through shared memory (double-buffered by cp.async), with
// an online softmax in fp32. The logits never reach global memory; the log-sum-exp is saved for the backward.
// The output leaves through shared memory in 16-byte coalesced stores.
#pragma once

#include "params.h"
#include "philox.h"
#include "platform.h"

namespace spidr {

constexpr int kThreads = 128;  // the delta and dQ kernels' blocks
constexpr int kBlockM = 64;    // the backward's query tile
constexpr int kBlockN = 64;    // the forward's key tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Shared-memory tiles are row-major with rows padded by 8 elements (16 bytes), so that the 8 rows an ldmatrix
// phase reads fall on different banks.
//
// The forward's shape per head dim and dropout. Head dim 64 without dropout runs 8 warps on 128 queries: each
// K/V tile that a block brings into shared memory serves twice the queries of a 4-warp block, so the tile
// traffic and the barriers per query halve, at the occupancy (16 warps per SM) the 4-warp blocks had. The others
// keep 4 warps on 64 queries: at their 168-255 registers a thread, an 8-warp block would be alone on its SM
// (docs/flash-attention.md).
// The K/V tiles are double-buffered: the next tile loads while this one is computed on; the output leaves
// through the first stage's buffers at the end.
template <int HeadDim, bool Dropout>
struct ForwardConfig {
  static constexpr int kWarps = HeadDim == 64 && !Dropout ? 8 : 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kBlockM = kWarps * 16;  // query rows per block
  static constexpr int kStride = HeadDim + 8;  // K, V and output tiles, (row, dim)
  static constexpr int kTile = kBlockN * kStride;
  static constexpr int kElements = 4 * kTile;                 // K and V, two stages
  static constexpr int kBytes = kElements * 2 + 2 * kBlockN;  // + one validity byte per key, two stages
  // Blocks per SM that the registers must allow, 0 for no requirement. Head dim 128 without dropout had 168
  // registers, three blocks (as many as shared memory allows), until the online softmax started from -inf;
  // ptxas then picks 184, two blocks, unless asked for three. Head dim 64 without dropout fits two 8-warp
  // blocks in 128 registers. (A requirement for the others makes them spill.)
  static constexpr int kMinBlocks = HeadDim == 128 && !Dropout ? 3 : HeadDim == 64 && !Dropout ? 2 : 0;
  static_assert(kBlockM * kStride <= 2 * kTile, "the output passes through one stage's buffers");
};

// Copies rows [row0, row0 + Rows) of a (tokens, heads, head_dim) tensor's head into a shared tile, zeros past
// `rows`, with Threads threads, without waiting: the copy lands by wait_async().
template <int HeadDim, int Rows, int Threads>
SPIDR_DEVICE void load_tile_async(uint16_t* tile, int stride, const uint16_t* source, int64_t token_stride, int row0,
                                  int rows) {
  constexpr int kChunksPerRow = HeadDim / 8;
  // Rolled: unrolled, ptxas keeps every copy's 64-bit source address live through the tile loop (the 8-warp
  // forward then spilled 36 bytes on sm_80, and the dropout kernels held 16 more registers).
  SPIDR_NO_UNROLL
  for (int chunk = thread_index(); chunk < Rows * kChunksPerRow; chunk += Threads) {
    int row = chunk / kChunksPerRow, column = (chunk % kChunksPerRow) * 8;
    bool valid = row0 + row < rows;
    copy16_async(tile + row * stride + column, source + (valid ? int64_t(row0 + row) * token_stride : 0) + column,
                 valid);
  }
}

// Fragments of a row-major shared tile, by ldmatrix (see mma_16x8x16 for the layouts).
// A operand: the 16x16 block at (row0, col0).
SPIDR_DEVICE void load_a(const uint16_t* tile, int stride, int row0, int col0, uint32_t (&a)[4]) {
  const int lane = thread_index() % kWarpSize, matrix = lane / 8;
  ldmatrix_x4<false>(a, tile + (row0 + lane % 8 + (matrix & 1) * 8) * stride + col0 + (matrix >> 1) * 8);
}

// One k-step of acc[nt] += A · B for every n-tile nt of acc, B's fragments read by ldmatrix from a row-major tile:
//   mma_nk_tile: B(k, n) = tile[n][k0 + k]   (the tile holds Bᵀ: K in Q Kᵀ, Q in K Qᵀ)
//   mma_kn_tile: B(k, n) = tile[k0 + k][n]   (the tile holds B: V in P V, K in dS K)
template <typename Element, int NTiles>
SPIDR_DEVICE void mma_nk_tile(float (&acc)[NTiles][4], const uint32_t (&a)[4], const uint16_t* tile, int stride,
                              int k0) {
  const int lane = thread_index() % kWarpSize, matrix = lane / 8;
  SPIDR_UNROLL
  for (int nt = 0; nt < NTiles; nt += 2) {
    uint32_t r[4];
    ldmatrix_x4<false>(r, tile + (nt * 8 + lane % 8 + (matrix >> 1) * 8) * stride + k0 + (matrix & 1) * 8);
    const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
    mma_16x8x16<Element>(acc[nt], a, b0);
    mma_16x8x16<Element>(acc[nt + 1], a, b1);
  }
}

template <typename Element, int NTiles>
SPIDR_DEVICE void mma_kn_tile(float (&acc)[NTiles][4], const uint32_t (&a)[4], const uint16_t* tile, int stride,
                              int k0) {
  const int lane = thread_index() % kWarpSize, matrix = lane / 8;
  SPIDR_UNROLL
  for (int nt = 0; nt < NTiles; nt += 2) {
    uint32_t r[4];
    ldmatrix_x4<true>(r, tile + (k0 + lane % 8 + (matrix & 1) * 8) * stride + nt * 8 + (matrix >> 1) * 8);
    const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
    mma_16x8x16<Element>(acc[nt], a, b0);
    mma_16x8x16<Element>(acc[nt + 1], a, b1);
  }
}

// The A fragments of a 16 x 16·(kk+1) product whose left operand is an accumulator (the FA2 register reuse):
// two n-tiles of the accumulator make one k-step of A.
template <typename Element>
SPIDR_DEVICE void accumulator_to_a(const float (&lo)[4], const float (&hi)[4], uint32_t (&a)[4]) {
  a[0] = Element::pack(lo[0], lo[1]);
  a[1] = Element::pack(lo[2], lo[3]);
  a[2] = Element::pack(hi[0], hi[1]);
  a[3] = Element::pack(hi[2], hi[3]);
}

// Sequence b's first token and length: from cu_seqlens, or, without it (a padded batch), max_seqlen tokens each.
struct SequenceBounds {
  int start, length;
};
SPIDR_DEVICE SequenceBounds sequence_bounds(const AttentionParams& p, int sequence) {
  if (p.cu_seqlens == nullptr) return {sequence * p.max_seqlen, p.max_seqlen};
  const int start = p.cu_seqlens[sequence];
  return {start, p.cu_seqlens[sequence + 1] - start};
}

// A warp's 16 rows (its lane's rows[0], rows[1]) of a (tokens, heads, head_dim) head as A fragments, straight
// from global memory (once per block: Q in the forward, Q and dO in the dQ pass); rows past `rows_count` are 0.
template <int HeadDim>
SPIDR_DEVICE void load_row_fragments(const uint16_t* source, int64_t token_stride, const int (&rows)[2], int rows_count,
                                     uint32_t (&frag)[HeadDim / 16][4]) {
  const int t = thread_index() % 4;
  SPIDR_UNROLL
  for (int kk = 0; kk < HeadDim / 16; ++kk) {
    SPIDR_UNROLL
    for (int r = 0; r < 4; ++r) {
      int row = rows[r % 2], column = kk * 16 + 2 * t + (r >= 2 ? 8 : 0);
      frag[kk][r] = row < rows_count ? load_u32(source + int64_t(row) * token_stride + column) : 0u;
    }
  }
}

// Dropout where a warp's rows are queries (the forward, the dQ pass): at an even n-tile nt, the draws of n-tiles nt
// and nt + 1, whose rows g, g + 8 and keys 2t + c, 2t + c + 8 are block c's (`row` = g's query, `key` = 2t's key);
// element i of n-tile nt then takes draw_of(draws[i % 2], i / 2, nt % 2).
SPIDR_DEVICE void query_row_draws(Philox4 (&draws)[2], const AttentionParams& p, int head, int start, int row, int key) {
  SPIDR_UNROLL
  for (int c = 0; c < 2; ++c) draws[c] = dropout_draws(p.rng_state, head, start, row, key + c);
}

// Issues key tile n0 of K and V into `stage` of a block's double buffer (K then V, each kBlockN x Stride; the
// caller waits and syncs before use) and writes one validity byte per key: in the sequence and not masked.
template <int HeadDim, int Threads, int Stride>
SPIDR_DEVICE void prefetch_key_tile(uint16_t* tiles, uint8_t* valid_bytes, const uint16_t* k, const uint16_t* v,
                                    const AttentionParams& p, int start, int seqlen, int n0, int stage) {
  constexpr int kTile = kBlockN * Stride;
  load_tile_async<HeadDim, kBlockN, Threads>(tiles + (2 * stage) * kTile, Stride, k, p.k_token_stride, n0, seqlen);
  load_tile_async<HeadDim, kBlockN, Threads>(tiles + (2 * stage + 1) * kTile, Stride, v, p.v_token_stride, n0, seqlen);
  commit_async();
  for (int key = thread_index(); key < kBlockN; key += Threads)
    valid_bytes[stage * kBlockN + key] = n0 + key < seqlen && (p.key_mask == nullptr || p.key_mask[start + n0 + key]);
}

template <typename Element, int HeadDim, bool Dropout>
SPIDR_GLOBAL void SPIDR_LAUNCH_BOUNDS((ForwardConfig<HeadDim, Dropout>::kThreads),
                                      (ForwardConfig<HeadDim, Dropout>::kMinBlocks))
    flash_forward_kernel(ForwardParams p) {
  using Config = ForwardConfig<HeadDim, Dropout>;
  constexpr int kKSteps = HeadDim / 16;  // k-steps of the QK^T product
  constexpr int kDimTiles = HeadDim / 8;  // n-tiles of the output

  const BlockIndex block = block_index();
  const int head = block.y, sequence = block.z;
  const SequenceBounds bounds = sequence_bounds(p, sequence);
  const int start = bounds.start, seqlen = bounds.length;
  const int m0 = block.x * Config::kBlockM;
  if (m0 >= seqlen) return;  // the whole block leaves together

  const int warp = thread_index() / kWarpSize, lane = thread_index() % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};  // this lane's two query rows

  const auto* q = static_cast<const uint16_t*>(p.q) + int64_t(start) * p.q_token_stride + head * p.q_head_stride;
  const auto* k = static_cast<const uint16_t*>(p.k) + int64_t(start) * p.k_token_stride + head * p.k_head_stride;
  const auto* v = static_cast<const uint16_t*>(p.v) + int64_t(start) * p.v_token_stride + head * p.v_head_stride;

  uint16_t* const smem = dynamic_shared_memory();
  auto* const valid_bytes = reinterpret_cast<uint8_t*>(smem + Config::kElements);
  auto prefetch = [&](int n0, int stage) {
    prefetch_key_tile<HeadDim, Config::kThreads, Config::kStride>(smem, valid_bytes, k, v, p, start, seqlen, n0, stage);
  };
  uint32_t q_frag[kKSteps][4];  // the warp's 16 query rows, loaded once
  load_row_fragments<HeadDim>(q, p.q_token_stride, rows, seqlen, q_frag);
  prefetch(0, 0);

  float acc[kDimTiles][4];
  SPIDR_UNROLL
  for (auto& tile : acc)
    SPIDR_UNROLL
    for (float& x : tile) x = 0.0f;
  // The online softmax works on logits already scaled to log2 units (s · scale · log2 e), masked ones -inf.
  // row_max stays -inf until the row meets a valid key.
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};  // this lane's share; the quad's shares are summed at the end
  const float scale_log2 = p.softmax_scale * kLog2e;

  for (int n0 = 0, stage = 0; n0 < seqlen; n0 += kBlockN, stage ^= 1) {
    wait_async();
    sync_block();  // tile n0 is in place for every thread, and no warp still reads the other stage
    if (n0 + kBlockN < seqlen) prefetch(n0 + kBlockN, stage ^ 1);
    const uint16_t* k_tile = smem + (2 * stage) * Config::kTile;
    const uint16_t* v_tile = smem + (2 * stage + 1) * Config::kTile;
    const uint8_t* key_valid = valid_bytes + stage * kBlockN;

    float s[kBlockN / 8][4];
    SPIDR_UNROLL
    for (int nt = 0; nt < kBlockN / 8; ++nt)
      for (float& x : s[nt]) x = 0.0f;
    SPIDR_UNROLL
    for (int kk = 0; kk < kKSteps; ++kk) mma_nk_tile<Element>(s, q_frag[kk], k_tile, Config::kStride, kk * 16);

    // Online softmax: the new running maximum, the factor that rescales what came before, the new weights.
    // Scaling before masking keeps a masked logit -inf whatever the scale's sign or size.
    float tile_max[2] = {-INFINITY, -INFINITY};
    SPIDR_UNROLL
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
      SPIDR_UNROLL
      for (int i = 0; i < 4; ++i) {
        s[nt][i] = key_valid[nt * 8 + 2 * t + i % 2] ? s[nt][i] * scale_log2 : -INFINITY;
        tile_max[i / 2] = fmaxf(tile_max[i / 2], s[nt][i]);
      }
    }
    float correction[2], subtracted_max[2];
    SPIDR_UNROLL
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], shfl_xor(tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], shfl_xor(tile_max[r], 2));
      float new_max = fmaxf(row_max[r], tile_max[r]);
      // While no key of the row is valid, subtract 0: -inf - -inf would be NaN. Every weight is then
      // exp2(-inf) = 0, and so is the correction of a row that had no valid key before this tile.
      subtracted_max[r] = new_max == -INFINITY ? 0.0f : new_max;
      correction[r] = fast_exp2(row_max[r] - subtracted_max[r]);
      row_max[r] = new_max;
      row_sum[r] *= correction[r];
    }
    SPIDR_UNROLL
    for (auto& tile : acc)
      SPIDR_UNROLL
      for (int i = 0; i < 4; ++i) tile[i] *= correction[i / 2];

    Philox4 draws[2];
    SPIDR_UNROLL
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
      if constexpr (Dropout) {
        if (nt % 2 == 0) query_row_draws(draws, p, head, start, rows[0], n0 + nt * 8 + 2 * t);
      }
      SPIDR_UNROLL
      for (int i = 0; i < 4; ++i) {
        float weight = fast_exp2(s[nt][i] - subtracted_max[i / 2]);
        row_sum[i / 2] += weight;  // the softmax normalises over every weight, dropped or not
        if constexpr (Dropout) {
          if (draw_of(draws[i % 2], i / 2, nt % 2) < p.drop_threshold) weight = 0.0f;
        }
        s[nt][i] = weight;
      }
    }

    // acc += P V: P's accumulator layout is the A fragment layout of this product, two n-tiles per k-step.
    SPIDR_UNROLL
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      accumulator_to_a<Element>(s[2 * kk], s[2 * kk + 1], a);
      mma_kn_tile<Element>(acc, a, v_tile, Config::kStride, kk * 16);
    }
  }

  // The output, normalised, through stage 0's buffers: each lane holds 4-byte pieces of two rows, which as global
  // stores would touch 8 rows' lines per instruction; from shared memory every thread stores whole 16 bytes.
  sync_block();  // no warp still reads the last K/V tiles
  uint16_t* const out_tile = smem;
  SPIDR_UNROLL
  for (int r = 0; r < 2; ++r) {
    float total = row_sum[r];
    total += shfl_xor(total, 1);
    total += shfl_xor(total, 2);
    float inverse = total > 0.0f ? (Dropout ? p.keep_scale : 1.0f) / total : 0.0f;  // no valid key: 0
    uint16_t* tile_row = out_tile + (warp * 16 + g + r * 8) * Config::kStride;
    SPIDR_UNROLL
    for (int dt = 0; dt < kDimTiles; ++dt)
      store_u32(tile_row + dt * 8 + 2 * t, Element::pack(acc[dt][2 * r] * inverse, acc[dt][2 * r + 1] * inverse));
    if (t == 0 && rows[r] < seqlen)
      p.lse[int64_t(head) * p.total_tokens + start + rows[r]] = row_max[r] * kLn2 + logf(total);
    // (no valid key: lse = -inf, and the backward gives such a row's keys no probability either way)
  }
  sync_block();
  auto* out = static_cast<uint16_t*>(p.out) + int64_t(start) * p.out_token_stride + head * p.out_head_stride;
  constexpr int kChunksPerRow = HeadDim / 8;
  for (int chunk = thread_index(); chunk < Config::kBlockM * kChunksPerRow; chunk += Config::kThreads) {
    const int row = chunk / kChunksPerRow, column = (chunk % kChunksPerRow) * 8;
    if (m0 + row >= seqlen) break;  // rows only grow with chunk
    uint32_t words[4];
    load_16(out_tile + row * Config::kStride + column, words);
    store_16(out + int64_t(m0 + row) * p.out_token_stride + column, words);
  }
}

}  // namespace spidr
