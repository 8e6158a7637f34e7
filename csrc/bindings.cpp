// pybind11 module spidr_fast._flash_attn: flash-attention forward and backward on raw pointers.
//
// The binding takes device pointers, element strides and the CUDA stream as integers from Python and does not
// link libtorch: one build serves every torch version of the same Python, builds in seconds without torch's
// headers, and the same file builds the CPU emulator (SPIDR_EMULATE). spidr_fast/ops/flash_attention.py
// validates the tensors before they reach this file, and allocates every output and workspace.
#include <pybind11/pybind11.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <tuple>

#include "flash/launch.h"

namespace py = pybind11;
using spidr::BackwardParams;
using spidr::ForwardParams;

#ifndef SPIDR_CUDA_ARCHS
#define SPIDR_CUDA_ARCHS ""
#endif

namespace {

using TensorView = std::tuple<uintptr_t, int64_t, int64_t>;  // (address, token stride, head stride)

void fill_common(spidr::AttentionParams& p, const TensorView& q, const TensorView& k, const TensorView& v,
                 uintptr_t cu_seqlens, uintptr_t key_mask, int batch, int heads, int head_dim, int max_seqlen,
                 int total_tokens, double softmax_scale, double dropout_p, uintptr_t rng_state) {
  if (!(dropout_p >= 0.0 && dropout_p < 1.0)) throw std::invalid_argument("dropout_p must be in [0, 1)");
  p.q = reinterpret_cast<const void*>(std::get<0>(q));
  p.k = reinterpret_cast<const void*>(std::get<0>(k));
  p.v = reinterpret_cast<const void*>(std::get<0>(v));
  std::tie(std::ignore, p.q_token_stride, p.q_head_stride) = q;
  std::tie(std::ignore, p.k_token_stride, p.k_head_stride) = k;
  std::tie(std::ignore, p.v_token_stride, p.v_head_stride) = v;
  p.cu_seqlens = reinterpret_cast<const int32_t*>(cu_seqlens);
  p.key_mask = reinterpret_cast<const uint8_t*>(key_mask);
  p.batch = batch;
  p.heads = heads;
  p.head_dim = head_dim;
  p.max_seqlen = max_seqlen;
  p.total_tokens = total_tokens;
  p.softmax_scale = float(softmax_scale);
  p.dropout = dropout_p > 0.0;
  p.drop_threshold = uint32_t(std::ldexp(dropout_p, 32));
  p.keep_scale = float(1.0 / (1.0 - dropout_p));
  p.rng_state = reinterpret_cast<const int64_t*>(rng_state);
  if (p.dropout && rng_state == 0) throw std::invalid_argument("dropout needs rng_state");
}

template <typename Element, int HeadDim>
void run(const ForwardParams& p, uintptr_t stream) {
  spidr::run_forward<Element, HeadDim>(p, stream);
}

template <typename Element, int HeadDim>
void run(const BackwardParams& p, uintptr_t stream) {
  if (p.grad_q_accum == nullptr)  // deterministic mode
    spidr::run_backward_deterministic<Element, HeadDim>(p, stream);
  else
    spidr::run_backward<Element, HeadDim>(p, stream);
}

template <typename Params>
void dispatch(const std::string& dtype, int head_dim, const Params& p, uintptr_t stream) {
  const bool bf16 = dtype == "bfloat16";
  if (!bf16 && dtype != "float16") throw std::invalid_argument("dtype must be bfloat16 or float16, got " + dtype);
  if (head_dim != 64 && head_dim != 128)
    throw std::invalid_argument("head_dim must be 64 or 128, got " + std::to_string(head_dim));
  py::gil_scoped_release release;
  if (head_dim == 64) {
    bf16 ? run<spidr::Bf16, 64>(p, stream) : run<spidr::Fp16, 64>(p, stream);
  } else {
    bf16 ? run<spidr::Bf16, 128>(p, stream) : run<spidr::Fp16, 128>(p, stream);
  }
}

void forward(const std::string& dtype, const TensorView& q, const TensorView& k, const TensorView& v,
             const TensorView& out, uintptr_t lse, uintptr_t cu_seqlens, uintptr_t key_mask, int batch, int heads,
             int head_dim, int max_seqlen, int total_tokens, double softmax_scale, double dropout_p,
             uintptr_t rng_state, uintptr_t stream) {
  ForwardParams p{};
  fill_common(p, q, k, v, cu_seqlens, key_mask, batch, heads, head_dim, max_seqlen, total_tokens, softmax_scale,
              dropout_p, rng_state);
  p.out = reinterpret_cast<void*>(std::get<0>(out));
  std::tie(std::ignore, p.out_token_stride, p.out_head_stride) = out;
  p.lse = reinterpret_cast<float*>(lse);
  dispatch(dtype, head_dim, p, stream);
}

void backward(const std::string& dtype, const TensorView& q, const TensorView& k, const TensorView& v,
              const TensorView& out, const TensorView& grad_out, uintptr_t lse, uintptr_t delta,
              uintptr_t grad_q_accum, uintptr_t grad_q, uintptr_t grad_k, uintptr_t grad_v, uintptr_t cu_seqlens,
              uintptr_t key_mask, int batch, int heads, int head_dim, int max_seqlen, int total_tokens,
              double softmax_scale, double dropout_p, uintptr_t rng_state, uintptr_t stream) {
  BackwardParams p{};
  fill_common(p, q, k, v, cu_seqlens, key_mask, batch, heads, head_dim, max_seqlen, total_tokens, softmax_scale,
              dropout_p, rng_state);
  p.out = reinterpret_cast<const void*>(std::get<0>(out));
  std::tie(std::ignore, p.out_token_stride, p.out_head_stride) = out;
  p.grad_out = reinterpret_cast<const void*>(std::get<0>(grad_out));
  std::tie(std::ignore, p.grad_out_token_stride, p.grad_out_head_stride) = grad_out;
  p.lse = reinterpret_cast<const float*>(lse);
  p.delta = reinterpret_cast<float*>(delta);
  p.grad_q_accum = reinterpret_cast<float*>(grad_q_accum);
  p.grad_q = reinterpret_cast<void*>(grad_q);
  p.grad_k = reinterpret_cast<void*>(grad_k);
  p.grad_v = reinterpret_cast<void*>(grad_v);
  p.grad_token_stride = int64_t(heads) * head_dim;  // the gradients are allocated contiguous
  p.grad_head_stride = head_dim;
  dispatch(dtype, head_dim, p, stream);
}

}  // namespace

PYBIND11_MODULE(_flash_attn, m) {
  m.doc() = "spidr_fast's flash-attention kernels (variable length, dropout), on raw pointers";
#ifdef SPIDR_EMULATE
  m.attr("emulated") = true;
#else
  m.attr("emulated") = false;
#endif
  m.attr("cuda_archs") = SPIDR_CUDA_ARCHS;
  m.attr("head_dims") = py::make_tuple(64, 128);
  m.attr("dtypes") = py::make_tuple("bfloat16", "float16");
  m.def("forward", &forward, "Forward: out and lse (heads, total_tokens) from packed q, k, v", py::arg("dtype"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("cu_seqlens"),
        py::arg("key_mask"), py::arg("batch"), py::arg("heads"), py::arg("head_dim"), py::arg("max_seqlen"),
        py::arg("total_tokens"), py::arg("softmax_scale"), py::arg("dropout_p"), py::arg("rng_state"),
        py::arg("stream"));
  m.def("backward", &backward, "Backward: dq, dk, dv (contiguous) from dout, with the forward's out and lse",
        py::arg("dtype"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("grad_out"),
        py::arg("lse"), py::arg("delta"), py::arg("grad_q_accum"), py::arg("grad_q"), py::arg("grad_k"),
        py::arg("grad_v"), py::arg("cu_seqlens"), py::arg("key_mask"), py::arg("batch"), py::arg("heads"),
        py::arg("head_dim"), py::arg("max_seqlen"), py::arg("total_tokens"), py::arg("softmax_scale"),
        py::arg("dropout_p"), py::arg("rng_state"), py::arg("stream"));
}
