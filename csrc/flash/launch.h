// Host entry points of the kernels, per (element type, head dim); defined in the per-head-dim files.
#pragma once

#include <cstdint>

#include "params.h"

namespace spidr {

struct Bf16;
struct Fp16;

template <typename Element, int HeadDim>
void run_forward(const ForwardParams& params, uintptr_t stream);

template <typename Element, int HeadDim>
void run_backward(const BackwardParams& params, uintptr_t stream);

// Deterministic mode (params.grad_q_accum null): dK and dV without dQ's atomics, then dQ by its own pass.
template <typename Element, int HeadDim>
void run_backward_deterministic(const BackwardParams& params, uintptr_t stream);

}  // namespace spidr
