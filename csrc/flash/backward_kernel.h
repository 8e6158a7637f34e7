// Flash-attention backward (FlashAttention-2 scheme). A block of warps owns 16 keys per warp of one (sequence,
// head) and walks the 64-query tiles: each warp recomputes its 16 keys' probabilities Pᵀ from the saved
// log-sum-exp, accumulates dV and dK in registers, and the block adds its share of dQ into an fp32 buffer with
// atomics.
// Two helper kernels: delta = rowsum(dO ∘ O) (and the fp32 dQ buffer zeroed) before, dQ's rounding after. In
// deterministic mode (no dQ buffer) the blocks leave dQ out and grad_q_kernel.h's pass sums it without atomics.
#pragma once

#include "forward_kernel.h"

namespace spidr {

// The backward's shape per head dim. Head dim 64 runs 8 warps on 128 keys: each query tile (Q, dO, lse, delta)
// brought into shared memory serves twice the keys, and a block's dQ atomics cover twice the keys, so both halve
// per key; at its 170-250 registers a thread, one 8-warp block per SM keeps the 8 warps two 4-warp blocks had.
// Alone on its SM, such a block has no other block to hide its loads behind, so its query tiles are
// double-buffered: the next one loads (cp.async) while this one is computed on. Head dim 128 keeps 4 warps on
// 64 keys and one buffer (250-254 registers; two buffers would also leave one block per SM by shared memory).
template <int HeadDim, bool AtomicGradQ>
struct BackwardConfig {
  static constexpr int kWarps = HeadDim == 64 ? 8 : 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kBlockKeys = kWarps * 16;
  // dQ = dS K: warp w computes query rows 16 (w % 4) onward, over kDimParts parts of the head dim.
  static constexpr int kDimParts = kWarps / 4;
  static constexpr int kStages = kWarps == 8 ? 2 : 1;  // query tile buffers
  static constexpr int kStride = HeadDim + 8;          // K, V, Q, dO tiles, row-major
  static constexpr int kDsStride = kBlockKeys + 8;     // dS tile, (query, key)
  static constexpr int kKeyTile = kBlockKeys * kStride;
  static constexpr int kQueryTile = kBlockM * kStride;
  static constexpr int kElements = 2 * kKeyTile + kStages * 2 * kQueryTile + (AtomicGradQ ? kBlockM * kDsStride : 0);
  static constexpr int kBytes = kElements * 2 + kStages * 2 * kBlockM * 4;  // + lse and delta of each query tile
};

// The delta kernel's rows (token, head) per block: each row is HeadDim / 8 lanes of 16 bytes, so a warp reads
// whole 128-byte lines; 8 passes make a block's work worth its launch.
constexpr int kDeltaPasses = 8;
template <int HeadDim>
constexpr int delta_rows_per_block() {
  return kThreads / (HeadDim / 8) * kDeltaPasses;
}

template <typename Element, int HeadDim>
SPIDR_GLOBAL void flash_backward_delta_kernel(BackwardParams p) {
  // delta = Σ_d dO·O in fp32 per (token, head), and the row's fp32 dQ accumulator, if any, zeroed in the same pass
  // (no separate memset launch before the backward).
  constexpr int kLanesPerRow = HeadDim / 8;
  const int64_t rows = int64_t(p.total_tokens) * p.heads;
  const int part = thread_index() % kLanesPerRow;
  for (int pass = 0; pass < kDeltaPasses; ++pass) {
    const int64_t row = int64_t(block_index().x) * delta_rows_per_block<HeadDim>() +
                        pass * (kThreads / kLanesPerRow) + thread_index() / kLanesPerRow;
    const bool valid = row < rows;
    const int token = valid ? int(row / p.heads) : 0, head = valid ? int(row % p.heads) : 0;
    float sum = 0.0f;
    if (valid) {
      uint32_t out[4], grad_out[4];
      load_16(static_cast<const uint16_t*>(p.out) + token * p.out_token_stride + head * p.out_head_stride + part * 8,
              out);
      load_16(static_cast<const uint16_t*>(p.grad_out) + token * p.grad_out_token_stride +
                  head * p.grad_out_head_stride + part * 8,
              grad_out);
      for (int i = 0; i < 8; ++i) {
        const int shift = (i % 2) * 16;
        sum += Element::to_float(uint16_t(out[i / 2] >> shift)) * Element::to_float(uint16_t(grad_out[i / 2] >> shift));
      }
      if (p.grad_q_accum != nullptr) {
        const uint32_t zeros[4] = {0, 0, 0, 0};
        float* accum = p.grad_q_accum + row * HeadDim + part * 8;
        store_16(accum, zeros);
        store_16(accum + 4, zeros);
      }
    }
    for (int mask = 1; mask < kLanesPerRow; mask *= 2) sum += shfl_xor(sum, mask);  // the row's lanes
    if (valid && part == 0) p.delta[int64_t(head) * p.total_tokens + token] = sum;
  }
}

template <typename Element, int HeadDim>
SPIDR_GLOBAL void flash_backward_grad_q_kernel(BackwardParams p) {
  // dQ = softmax_scale · (Σ dS K), rounded once from the fp32 accumulator; 8 elements a thread (32 bytes read, 16
  // written), one division per 8 instead of one per element.
  constexpr int kPartsPerRow = HeadDim / 8;
  const int64_t index = int64_t(block_index().x) * kThreads + thread_index();  // (row, part) of 8 elements
  const int64_t row = index / kPartsPerRow;
  if (row >= int64_t(p.total_tokens) * p.heads) return;
  const int64_t token = row / p.heads;
  const int head = int(row % p.heads), part = int(index % kPartsPerRow);
  float low[4], high[4];
  load_16(p.grad_q_accum + index * 8, low);
  load_16(p.grad_q_accum + index * 8 + 4, high);
  const float scale = p.softmax_scale;
  const uint32_t words[4] = {Element::pack(low[0] * scale, low[1] * scale), Element::pack(low[2] * scale, low[3] * scale),
                             Element::pack(high[0] * scale, high[1] * scale),
                             Element::pack(high[2] * scale, high[3] * scale)};
  store_16(static_cast<uint16_t*>(p.grad_q) + token * p.grad_token_stride + head * p.grad_head_stride + part * 8,
           words);
}

template <typename Element, int HeadDim, bool Dropout, bool AtomicGradQ>
SPIDR_GLOBAL void flash_backward_kernel(BackwardParams p) {
  using Smem = BackwardConfig<HeadDim, AtomicGradQ>;
  constexpr int kKSteps = HeadDim / 16;
  constexpr int kDimTiles = HeadDim / 8;
  constexpr int kQueryTiles = kBlockM / 8;

  const BlockIndex block = block_index();
  const int head = block.y, sequence = block.z;
  const SequenceBounds bounds = sequence_bounds(p, sequence);
  const int start = bounds.start, seqlen = bounds.length;
  const int n0 = block.x * Smem::kBlockKeys;
  if (n0 >= seqlen) return;

  const int warp = thread_index() / kWarpSize, lane = thread_index() % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int key_rows[2] = {warp * 16 + g, warp * 16 + g + 8};  // this lane's keys, within the tile
  bool key_valid[2];
  for (int r = 0; r < 2; ++r) {
    int key = n0 + key_rows[r];
    key_valid[r] = key < seqlen && (p.key_mask == nullptr || p.key_mask[start + key]);
  }

  const auto* q = static_cast<const uint16_t*>(p.q) + int64_t(start) * p.q_token_stride + head * p.q_head_stride;
  const auto* k = static_cast<const uint16_t*>(p.k) + int64_t(start) * p.k_token_stride + head * p.k_head_stride;
  const auto* v = static_cast<const uint16_t*>(p.v) + int64_t(start) * p.v_token_stride + head * p.v_head_stride;
  const auto* grad_out = static_cast<const uint16_t*>(p.grad_out) + int64_t(start) * p.grad_out_token_stride +
                         head * p.grad_out_head_stride;

  // K, V, then per stage Q and dO, then dS; after them per stage lse and delta.
  uint16_t* k_tile = dynamic_shared_memory();
  uint16_t* v_tile = k_tile + Smem::kKeyTile;
  uint16_t* query_tiles = v_tile + Smem::kKeyTile;
  uint16_t* ds_tile = query_tiles + Smem::kStages * 2 * Smem::kQueryTile;
  float* row_tiles = reinterpret_cast<float*>(k_tile + Smem::kElements);

  load_tile_async<HeadDim, Smem::kBlockKeys, Smem::kThreads>(k_tile, Smem::kStride, k, p.k_token_stride, n0, seqlen);
  load_tile_async<HeadDim, Smem::kBlockKeys, Smem::kThreads>(v_tile, Smem::kStride, v, p.v_token_stride, n0, seqlen);
  commit_async();
  wait_async();

  float grad_k[kDimTiles][4], grad_v[kDimTiles][4];
  SPIDR_UNROLL
  for (int dt = 0; dt < kDimTiles; ++dt)
    SPIDR_UNROLL
    for (int i = 0; i < 4; ++i) grad_k[dt][i] = grad_v[dt][i] = 0.0f;
  const float scale_log2 = p.softmax_scale * kLog2e;
  const float* lse = p.lse + int64_t(head) * p.total_tokens + start;
  const float* delta = p.delta + int64_t(head) * p.total_tokens + start;

  // Issues query tile m0's Q and dO into `stage` (landing by wait_async) and stores its lse and delta there.
  auto load_query_tile = [&](int m0, int stage) {
    uint16_t* q_stage = query_tiles + 2 * stage * Smem::kQueryTile;
    load_tile_async<HeadDim, kBlockM, Smem::kThreads>(q_stage, Smem::kStride, q, p.q_token_stride, m0, seqlen);
    if constexpr (Smem::kStages == 1) {  // Q lands before dO starts: ptxas then fits d128 with dropout, unspilled
      commit_async();
      wait_async();
    }
    load_tile_async<HeadDim, kBlockM, Smem::kThreads>(q_stage + Smem::kQueryTile, Smem::kStride, grad_out,
                                                      p.grad_out_token_stride, m0, seqlen);
    commit_async();
    float* rows = row_tiles + 2 * stage * kBlockM;
    for (int i = thread_index(); i < kBlockM; i += Smem::kThreads) {
      bool valid = m0 + i < seqlen;
      rows[i] = valid ? lse[m0 + i] : INFINITY;  // padded queries get probability 0
      rows[kBlockM + i] = valid ? delta[m0 + i] : 0.0f;
    }
  };
  // The key blocks of one (sequence, head) run side by side and add into the same dQ rows. Each starts its walk at
  // the query tile of its own keys and wraps around, so at any moment they add into different rows instead of
  // queueing on the same addresses.
  const int query_tiles_count = (seqlen + kBlockM - 1) / kBlockM;
  auto after = [&](int m0) { return m0 + kBlockM == query_tiles_count * kBlockM ? 0 : m0 + kBlockM; };
  int m0 = n0 / kBlockM % query_tiles_count * kBlockM;
  load_query_tile(m0, 0);

  for (int i = 0, stage = 0; i < query_tiles_count; ++i, m0 = after(m0), stage = (stage + 1) % Smem::kStages) {
    if constexpr (Smem::kStages == 1) {
      if (i > 0) {
        sync_block();  // the previous query tile is no longer read
        load_query_tile(m0, 0);
      }
    }
    wait_async();
    sync_block();  // this tile is in place for every thread; no warp still reads the other stage or dS
    if constexpr (Smem::kStages == 2) {
      if (i + 1 < query_tiles_count) load_query_tile(after(m0), stage ^ 1);
    }
    const uint16_t* q_tile = query_tiles + 2 * stage * Smem::kQueryTile;
    const uint16_t* grad_out_tile = q_tile + Smem::kQueryTile;
    const float* lse_tile = row_tiles + 2 * stage * kBlockM;
    const float* delta_tile = lse_tile + kBlockM;

    // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for the warp's 16 keys against the 64 queries.
    float prob[kQueryTiles][4], grad_prob[kQueryTiles][4];
    SPIDR_UNROLL
    for (int nt = 0; nt < kQueryTiles; ++nt)
      SPIDR_UNROLL
      for (int i = 0; i < 4; ++i) prob[nt][i] = grad_prob[nt][i] = 0.0f;
    SPIDR_UNROLL
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t k_frag[4], v_frag[4];
      load_a(k_tile, Smem::kStride, warp * 16, kk * 16, k_frag);
      load_a(v_tile, Smem::kStride, warp * 16, kk * 16, v_frag);
      mma_nk_tile<Element>(prob, k_frag, q_tile, Smem::kStride, kk * 16);
      mma_nk_tile<Element>(grad_prob, v_frag, grad_out_tile, Smem::kStride, kk * 16);
    }

    // P = exp(S·scale − lse); with dropout Z = keep / (1 − p): dV = (P∘Z)ᵀ dO, dS = P ∘ (Z∘dP − delta).
    // dV's product takes P∘keep and 1 / (1 − p) scales the fp32 dV once at the end, as FlashAttention-2 does:
    // rounding P / (1 − p) to the input dtype would add an error PyTorch does not make.
    // Dropout: the lane's keys g, g + 8 and queries 2t + c, 2t + c + 8 of n-tiles 2j, 2j + 1 are dropout block c's,
    // the forward's blocks seen transposed.
    float grad_logit[kQueryTiles][4];
    Philox4 draws[2];
    SPIDR_UNROLL
    for (int nt = 0; nt < kQueryTiles; ++nt) {
      if constexpr (Dropout) {
        if (nt % 2 == 0) {
          SPIDR_UNROLL
          for (int c = 0; c < 2; ++c)
            draws[c] = dropout_draws(p.rng_state, head, start, m0 + nt * 8 + 2 * t + c, n0 + key_rows[0]);
        }
      }
      SPIDR_UNROLL
      for (int i = 0; i < 4; ++i) {
        int query = nt * 8 + 2 * t + i % 2;
        float probability = key_valid[i / 2] ? fast_exp2(prob[nt][i] * scale_log2 - lse_tile[query] * kLog2e) : 0.0f;
        float dropped = probability, grad = grad_prob[nt][i];
        if constexpr (Dropout) {
          bool keep = draw_of(draws[i % 2], nt % 2, i / 2) >= p.drop_threshold;
          dropped = keep ? probability : 0.0f;
          grad = keep ? grad * p.keep_scale : 0.0f;
        }
        prob[nt][i] = dropped;
        grad_logit[nt][i] = probability * (grad - delta_tile[query]);
      }
    }

    // dV += (P∘keep)ᵀ dO and dK += dSᵀ Q: the accumulators' layout is the A fragment layout, queries as k.
    SPIDR_UNROLL
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      uint32_t a_prob[4], a_grad[4];
      accumulator_to_a<Element>(prob[2 * kk], prob[2 * kk + 1], a_prob);
      accumulator_to_a<Element>(grad_logit[2 * kk], grad_logit[2 * kk + 1], a_grad);
      mma_kn_tile<Element>(grad_v, a_prob, grad_out_tile, Smem::kStride, kk * 16);
      mma_kn_tile<Element>(grad_k, a_grad, q_tile, Smem::kStride, kk * 16);
    }

    if constexpr (AtomicGradQ) {
      // dS to shared memory as (query, key), then dQ[queries] += dS K: warp w takes the 16 queries from 16 (w % 4)
      // and part w / 4 of the head dim, over all the block's keys.
      SPIDR_UNROLL
      for (int nt = 0; nt < kQueryTiles; ++nt)
        SPIDR_UNROLL
        for (int i = 0; i < 4; ++i)
          ds_tile[(nt * 8 + 2 * t + i % 2) * Smem::kDsStride + key_rows[i / 2]] = round_to<Element>(grad_logit[nt][i]);
      sync_block();
      constexpr int kPartTiles = kDimTiles / Smem::kDimParts;
      const int query_group = Smem::kDimParts == 1 ? warp : warp % 4;
      const int dim0 = Smem::kDimParts == 1 ? 0 : warp / 4 * kPartTiles * 8;
      float grad_q[kPartTiles][4];
      SPIDR_UNROLL
      for (auto& tile : grad_q)
        SPIDR_UNROLL
        for (float& x : tile) x = 0.0f;
      SPIDR_UNROLL
      for (int kk = 0; kk < Smem::kBlockKeys / 16; ++kk) {
        uint32_t a[4];
        load_a(ds_tile, Smem::kDsStride, query_group * 16, kk * 16, a);
        mma_kn_tile<Element>(grad_q, a, k_tile + dim0, Smem::kStride, kk * 16);
      }
      SPIDR_UNROLL
      for (int r = 0; r < 2; ++r) {
        int query = m0 + query_group * 16 + g + r * 8;
        if (query >= seqlen) continue;
        float* row = p.grad_q_accum + (int64_t(start + query) * p.heads + head) * p.head_dim + dim0;
        SPIDR_UNROLL
        for (int dt = 0; dt < kPartTiles; ++dt)
          atomic_add_pair(row + dt * 8 + 2 * t, grad_q[dt][2 * r], grad_q[dt][2 * r + 1]);
      }
    }
  }

  const int64_t grad_offset = int64_t(start) * p.grad_token_stride + head * p.grad_head_stride;
  auto* grad_k_out = static_cast<uint16_t*>(p.grad_k) + grad_offset;
  auto* grad_v_out = static_cast<uint16_t*>(p.grad_v) + grad_offset;
  const float grad_v_scale = Dropout ? p.keep_scale : 1.0f;
  SPIDR_UNROLL
  for (int r = 0; r < 2; ++r) {
    int key = n0 + key_rows[r];
    if (key >= seqlen) continue;
    SPIDR_UNROLL
    for (int dt = 0; dt < kDimTiles; ++dt) {
      int64_t offset = int64_t(key) * p.grad_token_stride + dt * 8 + 2 * t;
      store_u32(grad_k_out + offset,
                Element::pack(grad_k[dt][2 * r] * p.softmax_scale, grad_k[dt][2 * r + 1] * p.softmax_scale));
      store_u32(grad_v_out + offset,
                Element::pack(grad_v[dt][2 * r] * grad_v_scale, grad_v[dt][2 * r + 1] * grad_v_scale));
    }
  }
}

}  // namespace spidr
