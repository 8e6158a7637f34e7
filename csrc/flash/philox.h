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

// One Philox call draws for a 2x2 block of attention weights: queries 2i, 2i+1 and keys 2j, 2j+1 of a sequence
// (positions within it; the sequence starts at token `start`). Counter (start + 2i, j, head, offset): unique per
// block, since start + 2i lies in the sequence's own token range. The forward's and the backward's fragments each
// hold two weights of a block, so both draw once per two weights.
SPIDR_HOST_DEVICE Philox4 dropout_draws(const int64_t* rng_state, int head, int start, int query, int key) {
  uint64_t seed = uint64_t(rng_state[0]), offset = uint64_t(rng_state[1]);
  return philox4x32_10({uint32_t(start + (query & ~1)), uint32_t(key >> 1), uint32_t(head), uint32_t(offset)},
                       uint32_t(seed), uint32_t(seed >> 32));
}

// The draw of weight (query, key) among its block's four.
SPIDR_HOST_DEVICE uint32_t draw_of(const Philox4& draws, int query, int key) {
  switch ((query & 1) * 2 + (key & 1)) {
    case 0: return draws.x;
    case 1: return draws.y;
    case 2: return draws.z;
    default: return draws.w;
  }
}

}  // namespace spidr
