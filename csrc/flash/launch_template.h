// The launchers behind launch.h, instantiated per head dim in forward_hdim*.cu and backward_hdim*.cu.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

#include "backward_kernel.h"
#include "forward_kernel.h"
#include "grad_q_kernel.h"
#include "launch.h"

namespace spidr {

template <typename Params>
void launch(void (*kernel)(Params), int grid_x, int grid_y, int grid_z, int threads, int shared_bytes,
            uintptr_t stream, const Params& params) {
  if (grid_x == 0 || grid_y == 0 || grid_z == 0) return;
#ifdef SPIDR_EMULATE
  emu::launch({unsigned(grid_x), unsigned(grid_y), unsigned(grid_z)}, {unsigned(threads), 1, 1},
              size_t(shared_bytes), [&] { kernel(params); });
#else
  auto check = [](cudaError_t status, const char* what) {
    if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
  };
  if (shared_bytes > 48 * 1024)
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes),
          "flash attention: shared memory request");
  kernel<<<dim3(grid_x, grid_y, grid_z), threads, shared_bytes, reinterpret_cast<cudaStream_t>(stream)>>>(params);
  check(cudaGetLastError(), "flash attention: kernel launch");
#endif
}

inline int ceil_div(int64_t a, int64_t b) { return int((a + b - 1) / b); }

template <typename Element, int HeadDim>
void run_forward(const ForwardParams& p, uintptr_t stream) {
  auto run = [&](auto dropout) {
    using Config = ForwardConfig<HeadDim, dropout.value>;
    launch(&flash_forward_kernel<Element, HeadDim, dropout.value>, ceil_div(p.max_seqlen, Config::kBlockM), p.heads,
           p.batch, Config::kThreads, Config::kBytes, stream, p);
  };
  p.dropout ? run(std::true_type{}) : run(std::false_type{});
}

// The delta pass, then the backward blocks (dK, dV, and dQ's atomics when AtomicGradQ).
template <typename Element, int HeadDim, bool AtomicGradQ>
void run_backward_blocks(const BackwardParams& p, uintptr_t stream) {
  const int64_t rows = int64_t(p.total_tokens) * p.heads;  // (token, head) rows
  launch(&flash_backward_delta_kernel<Element, HeadDim>, ceil_div(rows, delta_rows_per_block<HeadDim>()), 1, 1,
         kThreads, 0, stream, p);
  using Config = BackwardConfig<HeadDim, AtomicGradQ>;
  auto kernel = p.dropout ? &flash_backward_kernel<Element, HeadDim, true, AtomicGradQ>
                          : &flash_backward_kernel<Element, HeadDim, false, AtomicGradQ>;
  launch(kernel, ceil_div(p.max_seqlen, Config::kBlockKeys), p.heads, p.batch, Config::kThreads, Config::kBytes,
         stream, p);
}

template <typename Element, int HeadDim>
void run_backward(const BackwardParams& p, uintptr_t stream) {
  run_backward_blocks<Element, HeadDim, true>(p, stream);
  const int64_t pieces = int64_t(p.total_tokens) * p.heads * HeadDim / 8;  // 8 elements a thread
  launch(&flash_backward_grad_q_kernel<Element, HeadDim>, ceil_div(pieces, kThreads), 1, 1, kThreads, 0, stream, p);
}

template <typename Element, int HeadDim>
void run_backward_deterministic(const BackwardParams& p, uintptr_t stream) {
  run_backward_blocks<Element, HeadDim, false>(p, stream);
  using Config = GradQConfig<HeadDim>;
  auto kernel = p.dropout ? &flash_backward_grad_q_pass_kernel<Element, HeadDim, true>
                          : &flash_backward_grad_q_pass_kernel<Element, HeadDim, false>;
  launch(kernel, ceil_div(p.max_seqlen, Config::kBlockM), p.heads, p.batch, Config::kThreads, Config::kBytes, stream,
         p);
}

}  // namespace spidr
