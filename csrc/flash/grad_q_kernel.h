// dQ without atomics, for deterministic mode: a block of 4 warps owns 64 queries of one (sequence, head) and walks
// the 64-key tiles as the forward does, recomputing P from the saved log-sum-exp and dP = dO Vᵀ, and sums
// dQ = softmax_scale · dS K in registers, always in the same order, so a rerun gives the same bits. It repeats two
// of the backward's matrix products (S and dP), which is why the atomic backward stays the default.
#pragma once

#include "forward_kernel.h"

namespace spidr {

template <int HeadDim>
struct GradQConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kBlockM = kWarps * 16;  // query rows per block
  static constexpr int kStride = HeadDim + 8;  // K and V tiles, (row, dim)
  static constexpr int kElements = 4 * kBlockN * kStride;     // K and V, two stages
  static constexpr int kBytes = kElements * 2 + 2 * kBlockN;  // + one validity byte per key, two stages
};

template <typename Element, int HeadDim, bool Dropout>
SPIDR_GLOBAL void SPIDR_LAUNCH_BOUNDS(GradQConfig<HeadDim>::kThreads, 0) flash_backward_grad_q_pass_kernel(BackwardParams p) {
  using Config = GradQConfig<HeadDim>;
  constexpr int kKSteps = HeadDim / 16;
  constexpr int kDimTiles = HeadDim / 8;

  const BlockIndex block = block_index();
  const int head = block.y, sequence = block.z;
  const SequenceBounds bounds = sequence_bounds(p, sequence);
  const int start = bounds.start, seqlen = bounds.length;
  const int m0 = block.x * Config::kBlockM;
  if (m0 >= seqlen) return;

  const int warp = thread_index() / kWarpSize, lane = thread_index() % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};

  const auto* q = static_cast<const uint16_t*>(p.q) + int64_t(start) * p.q_token_stride + head * p.q_head_stride;
  const auto* k = static_cast<const uint16_t*>(p.k) + int64_t(start) * p.k_token_stride + head * p.k_head_stride;
  const auto* v = static_cast<const uint16_t*>(p.v) + int64_t(start) * p.v_token_stride + head * p.v_head_stride;
  const auto* grad_out = static_cast<const uint16_t*>(p.grad_out) + int64_t(start) * p.grad_out_token_stride +
                         head * p.grad_out_head_stride;

  uint16_t* const smem = dynamic_shared_memory();
  auto* const valid_bytes = reinterpret_cast<uint8_t*>(smem + Config::kElements);
  auto prefetch = [&](int n0, int stage) {
    prefetch_key_tile<HeadDim, Config::kThreads, Config::kStride>(smem, valid_bytes, k, v, p, start, seqlen, n0, stage);
  };
  uint32_t q_frag[kKSteps][4], grad_out_frag[kKSteps][4];
  load_row_fragments<HeadDim>(q, p.q_token_stride, rows, seqlen, q_frag);
  load_row_fragments<HeadDim>(grad_out, p.grad_out_token_stride, rows, seqlen, grad_out_frag);
  prefetch(0, 0);

  float lse[2], delta[2];  // padded rows: probability 0
  SPIDR_UNROLL
  for (int r = 0; r < 2; ++r) {
    const bool valid = rows[r] < seqlen;
    lse[r] = valid ? p.lse[int64_t(head) * p.total_tokens + start + rows[r]] : INFINITY;
    delta[r] = valid ? p.delta[int64_t(head) * p.total_tokens + start + rows[r]] : 0.0f;
  }
  float acc[kDimTiles][4];
  SPIDR_UNROLL
  for (auto& tile : acc)
    SPIDR_UNROLL
    for (float& x : tile) x = 0.0f;
  const float scale_log2 = p.softmax_scale * kLog2e;

  for (int n0 = 0, stage = 0; n0 < seqlen; n0 += kBlockN, stage ^= 1) {
    wait_async();
    sync_block();  // tile n0 is in place for every thread, and no warp still reads the other stage
    if (n0 + kBlockN < seqlen) prefetch(n0 + kBlockN, stage ^ 1);
    const uint16_t* k_tile = smem + (2 * stage) * kBlockN * Config::kStride;
    const uint16_t* v_tile = k_tile + kBlockN * Config::kStride;
    const uint8_t* key_valid = valid_bytes + stage * kBlockN;

    // S = Q Kᵀ and dP = dO Vᵀ for the warp's 16 queries against the tile's 64 keys.
    float grad_logit[kBlockN / 8][4], grad_prob[kBlockN / 8][4];
    SPIDR_UNROLL
    for (int nt = 0; nt < kBlockN / 8; ++nt)
      SPIDR_UNROLL
      for (int i = 0; i < 4; ++i) grad_logit[nt][i] = grad_prob[nt][i] = 0.0f;
    SPIDR_UNROLL
    for (int kk = 0; kk < kKSteps; ++kk) {
      mma_nk_tile<Element>(grad_logit, q_frag[kk], k_tile, Config::kStride, kk * 16);
      mma_nk_tile<Element>(grad_prob, grad_out_frag[kk], v_tile, Config::kStride, kk * 16);
    }

    // dS = P ∘ (Z∘dP − delta), as the atomic backward computes it, with the forward's dropout draws.
    Philox4 draws[2];
    SPIDR_UNROLL
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
      if constexpr (Dropout) {
        if (nt % 2 == 0) query_row_draws(draws, p, head, start, rows[0], n0 + nt * 8 + 2 * t);
      }
      SPIDR_UNROLL
      for (int i = 0; i < 4; ++i) {
        float probability = key_valid[nt * 8 + 2 * t + i % 2]
                                ? fast_exp2(grad_logit[nt][i] * scale_log2 - lse[i / 2] * kLog2e)
                                : 0.0f;
        float grad = grad_prob[nt][i];
        if constexpr (Dropout) {
          bool keep = draw_of(draws[i % 2], i / 2, nt % 2) >= p.drop_threshold;
          grad = keep ? grad * p.keep_scale : 0.0f;
        }
        grad_logit[nt][i] = probability * (grad - delta[i / 2]);
      }
    }

    // dQ += dS K: dS's accumulator layout is the A fragment layout, keys as k (rounded to 16 bits, as the atomic
    // backward rounds its dS tile).
    SPIDR_UNROLL
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      accumulator_to_a<Element>(grad_logit[2 * kk], grad_logit[2 * kk + 1], a);
      mma_kn_tile<Element>(acc, a, k_tile, Config::kStride, kk * 16);
    }
  }

  auto* grad_q = static_cast<uint16_t*>(p.grad_q) + int64_t(start) * p.grad_token_stride + head * p.grad_head_stride;
  SPIDR_UNROLL
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= seqlen) continue;
    SPIDR_UNROLL
    for (int dt = 0; dt < kDimTiles; ++dt)
      store_u32(grad_q + int64_t(rows[r]) * p.grad_token_stride + dt * 8 + 2 * t,
                Element::pack(acc[dt][2 * r] * p.softmax_scale, acc[dt][2 * r + 1] * p.softmax_scale));
  }
}

}  // namespace spidr
