// A CPU emulator for the flash-attention kernels: each CUDA thread of a block is a fiber on one CPU thread
// (started by ucontext, switched by _setjmp/_longjmp) that yields only at barriers, so barriers, warp shuffles and
// warp-wide tensor-core instructions keep their CUDA meaning. A barrier that not every thread reaches is reported
// as an error instead of hanging.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>

namespace spidr::emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// Runs body() once per thread of every block of `grid`, blocks one after another.
void launch(Dim3 grid, Dim3 block, size_t shared_bytes, const std::function<void()>& body);

int thread_index();
struct BlockCoordinates {
  int x, y, z;
};
BlockCoordinates block_coordinates();
unsigned char* shared_memory();
void sync_block();
// Asynchronous copies land only at this fiber's wait_async, so a kernel that reads them sooner reads stale data.
void copy16_async(uint16_t* destination, const uint16_t* source, bool valid);
void wait_async();
float shfl_xor(float value, int lane_mask);
void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row, bool transposed);
void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], float (*to_float)(uint16_t));

uint16_t float_to_bf16(float value);
uint16_t float_to_fp16(float value);
float fp16_to_float(uint16_t bits);
inline float exp2(float x) { return std::exp2(x); }

}  // namespace spidr::emu
