// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): counter-based, so the
// backward regenerates the forward's dropout mask from (seed, offset, position) without storing it.
// spidr_fast/ops/flash_attention.py has the same generator in NumPy; the tests hold the two equal.
#pragma once

#include "platform.h"

namespace spidr {

struct Philox4 {
  uint32_t x, y, z, w;
};

SPIDR_HOST_DEVICE Philox4 philox4x32_10(Philox4 counter, uint32_t key0, uint32_t key1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key0 += 0x9E3779B9u;
      key1 += 0xBB67AE85u;
    }
    uint64_t product0 = uint64_t(0xD2511F53u) * counter.x;
    uint64_t product1 = uint64_t(0xCD9E8D57u) * counter.z;
    counter = {uint32_t(product1 >> 32) ^ counter.y ^ key0, uint32_t(product1),
               uint32_t(product0 >> 32) ^ counter.w ^ key1, uint32_t(product0)};
  }
  return counter;
}

// One Philox call draws for a block of four attention weights: queries q, q + 8 and keys k, k + 8 of a sequence
// (positions within it, q and k ≡ 0..7 mod 16; the sequence starts at token `start`). Such a block lies whole in
// one lane's mma fragments in the forward (its rows g, g + 8; keys 2t + c of two adjacent n-tiles) and in the
// transposed backward (its keys g, g + 8; queries 2t + c of two adjacent n-tiles), so both passes draw once per
// four weights. Counter (start + q, 8 ⌊k / 16⌋ + k mod 16, head, offset): unique per block, since start + q lies
// in the sequence's own token range. Any (query, key) of the block gives its draws.
SPIDR_HOST_DEVICE Philox4 dropout_draws(const int64_t* rng_state, int head, int start, int query, int key) {
  uint64_t seed = uint64_t(rng_state[0]), offset = uint64_t(rng_state[1]);
  return philox4x32_10({uint32_t(start + (query & ~8)), uint32_t((key >> 4) * 8 + (key & 7)), uint32_t(head),
                        uint32_t(offset)},
                       uint32_t(seed), uint32_t(seed >> 32));
}

// The draw of the block's weight (q + 8 · query_high, k + 8 · key_high). The kernels' tiles start on multiples
// of 16, so they pass bits of a fragment element's index: constants once the loops unroll, leaving no select.
SPIDR_HOST_DEVICE uint32_t draw_of(const Philox4& draws, int query_high, int key_high) {
  if (query_high == 0) return key_high == 0 ? draws.x : draws.y;
  return key_high == 0 ? draws.z : draws.w;
}

}  // namespace spidr
