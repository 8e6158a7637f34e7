// Flash-attention forward (FlashAttention-2 scheme): a block of 4 warps owns 64 query rows of one (sequence,
// head); each warp owns 16 rows and streams 64-key tiles of K and V through shared memory, with an online
// softmax in fp32. The logits never reach global memory; the log-sum-exp is saved for the backward.
#pragma once

#include <cfloat>

#include "params.h"
#include "philox.h"
#include "platform.h"

namespace spidr {

constexpr int kThreads = 128;  // 4 warps
constexpr int kBlockM = 64;    // query rows per block (16 per warp)
constexpr int kBlockN = 64;    // keys per tile
constexpr float kLog2e = 1.4426950408889634f;

// Shared-memory rows are padded by 8 elements (16 bytes) so that the 8 rows a warp reads at once fall on
// different banks.
template <int HeadDim>
struct ForwardSmem {
  static constexpr int kKStride = HeadDim + 8;   // K tile, row-major (key, dim)
  static constexpr int kVtStride = kBlockN + 8;  // V tile, transposed (dim, key): the PV product's B operand
  static constexpr int kKElements = kBlockN * kKStride;
  static constexpr int kElements = kKElements + HeadDim * kVtStride;
  static constexpr int kBytes = kElements * 2 + kBlockN;  // + one validity byte per key of the tile
};

// Copies rows [row0, row0 + 64) of a (tokens, heads, head_dim) tensor's head into shared memory, zeros past
// `rows`. transposed: element (row, d) lands at d * stride + row, else at row * stride + d.
template <int HeadDim, bool Transposed>
SPIDR_DEVICE void load_tile(uint16_t* tile, int stride, const uint16_t* source, int64_t token_stride, int row0,
                            int rows) {
  constexpr int kChunksPerRow = HeadDim / 8;
  for (int chunk = thread_index(); chunk < kBlockN * kChunksPerRow; chunk += kThreads) {
    int row = chunk / kChunksPerRow, column = (chunk % kChunksPerRow) * 8;
    alignas(16) uint16_t values[8];
    if (row0 + row < rows) {
      copy16(values, source + int64_t(row0 + row) * token_stride + column);
    } else {
      zero16(values);
    }
    if constexpr (Transposed) {
      SPIDR_UNROLL
      for (int e = 0; e < 8; ++e) tile[(column + e) * stride + row] = values[e];
    } else {
      copy16(tile + row * stride + column, values);
    }
  }
}

template <typename Element, int HeadDim, bool Dropout>
SPIDR_GLOBAL void flash_forward_kernel(ForwardParams p) {
  using Smem = ForwardSmem<HeadDim>;
  constexpr int kKSteps = HeadDim / 16;  // k-steps of the QK^T product
  constexpr int kDimTiles = HeadDim / 8;  // n-tiles of the output

  const BlockIndex block = block_index();
  const int head = block.y, sequence = block.z;
  const int start = p.cu_seqlens[sequence];
  const int seqlen = p.cu_seqlens[sequence + 1] - start;
  const int m0 = block.x * kBlockM;
  if (m0 >= seqlen) return;  // the whole block leaves together

  const int warp = thread_index() / kWarpSize, lane = thread_index() % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};  // this lane's two query rows

  const auto* q = static_cast<const uint16_t*>(p.q) + int64_t(start) * p.q_token_stride + head * p.q_head_stride;
  const auto* k = static_cast<const uint16_t*>(p.k) + int64_t(start) * p.k_token_stride + head * p.k_head_stride;
  const auto* v = static_cast<const uint16_t*>(p.v) + int64_t(start) * p.v_token_stride + head * p.v_head_stride;

  // The warp's 16 query rows as A fragments, loaded once.
  uint32_t q_frag[kKSteps][4];
  SPIDR_UNROLL
  for (int kk = 0; kk < kKSteps; ++kk) {
    SPIDR_UNROLL
    for (int r = 0; r < 4; ++r) {
      int row = rows[r % 2], column = kk * 16 + 2 * t + (r >= 2 ? 8 : 0);
      q_frag[kk][r] = row < seqlen ? load_u32(q + int64_t(row) * p.q_token_stride + column) : 0u;
    }
  }

  uint16_t* k_tile = dynamic_shared_memory();
  uint16_t* vt_tile = k_tile + Smem::kKElements;
  auto* key_valid = reinterpret_cast<uint8_t*>(k_tile + Smem::kElements);

  float acc[kDimTiles][4];
  SPIDR_UNROLL
  for (auto& tile : acc)
    SPIDR_UNROLL
    for (float& x : tile) x = 0.0f;
  float row_max[2] = {-FLT_MAX, -FLT_MAX};  // finite: the first correction factor is exp2(-huge) = 0
  float row_sum[2] = {0.0f, 0.0f};           // this lane's share; the quad's shares are summed at the end
  const float scale_log2 = p.softmax_scale * kLog2e;

  for (int n0 = 0; n0 < seqlen; n0 += kBlockN) {
    sync_block();  // every warp is done with the previous tile
    load_tile<HeadDim, false>(k_tile, Smem::kKStride, k, p.k_token_stride, n0, seqlen);
    load_tile<HeadDim, true>(vt_tile, Smem::kVtStride, v, p.v_token_stride, n0, seqlen);
    for (int key = thread_index(); key < kBlockN; key += kThreads)
      key_valid[key] = n0 + key < seqlen && (p.key_mask == nullptr || p.key_mask[start + n0 + key]);
    sync_block();

    float s[kBlockN / 8][4];
    SPIDR_UNROLL
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
      SPIDR_UNROLL
      for (float& x : s[nt]) x = 0.0f;
      const uint16_t* key_row = k_tile + (nt * 8 + g) * Smem::kKStride + 2 * t;
      SPIDR_UNROLL
      for (int kk = 0; kk < kKSteps; ++kk) {
        const uint32_t b[2] = {load_u32(key_row + kk * 16), load_u32(key_row + kk * 16 + 8)};
        mma_16x8x16<Element>(s[nt], q_frag[kk], b);
      }
    }

    // Online softmax: the new running maximum, the factor that rescales what came before, the new weights.
    float tile_max[2] = {-FLT_MAX, -FLT_MAX};
    SPIDR_UNROLL
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
      SPIDR_UNROLL
      for (int i = 0; i < 4; ++i) {
        if (!key_valid[nt * 8 + 2 * t + i % 2]) s[nt][i] = -INFINITY;
        tile_max[i / 2] = fmaxf(tile_max[i / 2], s[nt][i]);
      }
    }
    float correction[2];
    SPIDR_UNROLL
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], shfl_xor(tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], shfl_xor(tile_max[r], 2));
      float new_max = fmaxf(row_max[r], tile_max[r]);
      correction[r] = fast_exp2((row_max[r] - new_max) * scale_log2);
      row_max[r] = new_max;
      row_sum[r] *= correction[r];
    }
    SPIDR_UNROLL
    for (auto& tile : acc)
      SPIDR_UNROLL
      for (int i = 0; i < 4; ++i) tile[i] *= correction[i / 2];

    SPIDR_UNROLL
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
      Philox4 draws[2];
      if constexpr (Dropout) {
        SPIDR_UNROLL
        for (int r = 0; r < 2; ++r)
          draws[r] = dropout_draws(p.rng_state, head, start + rows[r], (n0 + nt * 8 + 2 * t) / 4);
      }
      SPIDR_UNROLL
      for (int i = 0; i < 4; ++i) {
        float weight = fast_exp2(s[nt][i] * scale_log2 - row_max[i / 2] * scale_log2);
        row_sum[i / 2] += weight;  // the softmax normalises over every weight, dropped or not
        if constexpr (Dropout) {
          if (draw_of(draws[i / 2], n0 + nt * 8 + 2 * t + i % 2) < p.drop_threshold) weight = 0.0f;
        }
        s[nt][i] = weight;
      }
    }

    // acc += P V: P's accumulator layout is the A fragment layout of the next product, two n-tiles per k-step.
    SPIDR_UNROLL
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t a[4] = {Element::pack(s[2 * kk][0], s[2 * kk][1]), Element::pack(s[2 * kk][2], s[2 * kk][3]),
                             Element::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             Element::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      SPIDR_UNROLL
      for (int dt = 0; dt < kDimTiles; ++dt) {
        const uint16_t* value_column = vt_tile + (dt * 8 + g) * Smem::kVtStride + kk * 16 + 2 * t;
        const uint32_t b[2] = {load_u32(value_column), load_u32(value_column + 8)};
        mma_16x8x16<Element>(acc[dt], a, b);
      }
    }
  }

  auto* out = static_cast<uint16_t*>(p.out) + int64_t(start) * p.out_token_stride + head * p.out_head_stride;
  SPIDR_UNROLL
  for (int r = 0; r < 2; ++r) {
    float total = row_sum[r];
    total += shfl_xor(total, 1);
    total += shfl_xor(total, 2);
    if (rows[r] >= seqlen) continue;
    float inverse = total > 0.0f ? (Dropout ? p.keep_scale : 1.0f) / total : 0.0f;  // no valid key: 0
    uint16_t* out_row = out + int64_t(rows[r]) * p.out_token_stride;
    SPIDR_UNROLL
    for (int dt = 0; dt < kDimTiles; ++dt)
      store_u32(out_row + dt * 8 + 2 * t, Element::pack(acc[dt][2 * r] * inverse, acc[dt][2 * r + 1] * inverse));
    if (t == 0) p.lse[int64_t(head) * p.total_tokens + start + rows[r]] = row_max[r] * p.softmax_scale + logf(total);
    // (no valid key: lse = -inf, and the backward gives such a row's keys no probability either way)
  }
}

}  // namespace spidr
