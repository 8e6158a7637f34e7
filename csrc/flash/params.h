// What the Python side hands the kernels: raw device pointers, element strides and sizes. Tensors are packed
// (total_tokens, heads, head_dim) with a unit stride on head_dim; sequence b owns tokens
// [cu_seqlens[b], cu_seqlens[b + 1]). Self-attention only: queries and keys share cu_seqlens.
#pragma once

#include <cstdint>

namespace spidr {

struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_token_stride, q_head_stride;
  int64_t k_token_stride, k_head_stride;
  int64_t v_token_stride, v_head_stride;
  const int32_t* cu_seqlens;  // (batch + 1,), or null: sequence b is tokens [b · max_seqlen, (b + 1) · max_seqlen)
  // Optional (total_tokens,) bool: keys whose byte is 0 take no attention (SDPA's key_padding_mask). Queries are
  // all computed, padded ones included, as SDPA computes them; a query with no valid key gets 0.
  const uint8_t* key_mask;
  int batch, heads, head_dim, max_seqlen, total_tokens;
  float softmax_scale;
  // Dropout: keep an attention weight when its 32-bit Philox draw is >= drop_threshold (= dropout_p · 2^32);
  // the seed and offset are read on the device from rng_state (int64 [seed, offset]), so the op stays a pure
  // function of its tensors and CUDA-graph capture sees no host value.
  bool dropout;
  uint32_t drop_threshold;
  float keep_scale;  // 1 / (1 - dropout_p)
  const int64_t* rng_state;
};

struct ForwardParams : AttentionParams {
  void* out;  // q's layout
  int64_t out_token_stride, out_head_stride;
  float* lse;  // (heads, total_tokens) natural log-sum-exp of the scaled logits, for the backward
};

struct BackwardParams : AttentionParams {
  const void* out;
  const void* grad_out;
  int64_t out_token_stride, out_head_stride;
  int64_t grad_out_token_stride, grad_out_head_stride;
  const float* lse;
  float* delta;        // (heads, total_tokens) workspace: rowsum(grad_out * out)
  // (total_tokens, heads, head_dim) fp32 workspace for dQ's atomics, zeroed by the delta kernel; null in
  // deterministic mode, where dQ is summed by its own pass without atomics
  float* grad_q_accum;
  void* grad_q;
  void* grad_k;
  void* grad_v;
  int64_t grad_token_stride, grad_head_stride;  // shared by grad_q, grad_k, grad_v
};

}  // namespace spidr
