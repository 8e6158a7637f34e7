// The few device primitives the flash-attention kernels use, for nvcc or for the CPU emulator.
//
// Built by nvcc they are CUDA intrinsics and inline PTX. Built by a C++ compiler with SPIDR_EMULATE they run
// every CUDA thread of a block as a fiber on one CPU thread (csrc/emulate/), with the same tensor-core fragment
// layouts, so the kernels' indexing, online softmax, dropout and backward are tested on machines without a GPU.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef SPIDR_EMULATE
#include "../emulate/emulator.h"
#define SPIDR_DEVICE inline
#define SPIDR_HOST_DEVICE inline
#define SPIDR_GLOBAL
#define SPIDR_LAUNCH_BOUNDS(threads, min_blocks)
#define SPIDR_RESTRICT
#define SPIDR_UNROLL
#define SPIDR_NO_UNROLL
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define SPIDR_DEVICE __device__ __forceinline__
#define SPIDR_HOST_DEVICE __host__ __device__ __forceinline__
#define SPIDR_GLOBAL __global__
#define SPIDR_LAUNCH_BOUNDS(threads, min_blocks) __launch_bounds__(threads, min_blocks)
#define SPIDR_RESTRICT __restrict__
#define SPIDR_UNROLL _Pragma("unroll")  // fixed-size register arrays must not spill to local memory
#define SPIDR_NO_UNROLL _Pragma("unroll 1")  // a loop whose unrolled copies would each hold their own addresses
#endif

namespace spidr {

constexpr int kWarpSize = 32;

// 16-bit floating-point element types, carried as raw bits everywhere; only these helpers interpret them.
struct Bf16 {
  static SPIDR_DEVICE float to_float(uint16_t bits) {
#ifdef SPIDR_EMULATE
    uint32_t word = uint32_t(bits) << 16;
    float value;
    std::memcpy(&value, &word, 4);
    return value;
#else
    return __uint_as_float(uint32_t(bits) << 16);
#endif
  }
  static SPIDR_DEVICE uint32_t pack(float lo, float hi) {  // round to nearest even, lo in the low half
#ifdef SPIDR_EMULATE
    return uint32_t(emu::float_to_bf16(lo)) | (uint32_t(emu::float_to_bf16(hi)) << 16);
#else
    __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&pair);
#endif
  }
  static constexpr bool kIsBf16 = true;
};

struct Fp16 {
  static SPIDR_DEVICE float to_float(uint16_t bits) {
#ifdef SPIDR_EMULATE
    return emu::fp16_to_float(bits);
#else
    return __half2float(__ushort_as_half(bits));
#endif
  }
  static SPIDR_DEVICE uint32_t pack(float lo, float hi) {
#ifdef SPIDR_EMULATE
    return uint32_t(emu::float_to_fp16(lo)) | (uint32_t(emu::float_to_fp16(hi)) << 16);
#else
    __half2 pair = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&pair);
#endif
  }
  static constexpr bool kIsBf16 = false;
};

template <typename Element>
SPIDR_DEVICE uint16_t round_to(float value) {
  return uint16_t(Element::pack(value, 0.0f) & 0xffffu);
}

SPIDR_DEVICE uint32_t load_u32(const uint16_t* address) {  // two adjacent elements, 4-byte aligned
  uint32_t word;
#ifdef SPIDR_EMULATE
  std::memcpy(&word, address, 4);
#else
  word = *reinterpret_cast<const uint32_t*>(address);
#endif
  return word;
}

SPIDR_DEVICE void store_u32(uint16_t* address, uint32_t word) {
#ifdef SPIDR_EMULATE
  std::memcpy(address, &word, 4);
#else
  *reinterpret_cast<uint32_t*>(address) = word;
#endif
}

// 16 bytes (8 elements, or 4 floats) at a 16-byte aligned address, global or shared: one vector access.
template <typename Word>  // uint32_t (pairs of 16-bit elements) or float
SPIDR_DEVICE void load_16(const void* address, Word (&words)[4]) {
  static_assert(sizeof(Word) == 4, "four 4-byte words");
#ifdef SPIDR_EMULATE
  std::memcpy(words, address, 16);
#else
  const uint4 vector = *reinterpret_cast<const uint4*>(address);
  memcpy(words, &vector, 16);  // a register move
#endif
}

SPIDR_DEVICE void store_16(void* address, const uint32_t (&words)[4]) {
#ifdef SPIDR_EMULATE
  std::memcpy(address, words, 16);
#else
  *reinterpret_cast<uint4*>(address) = make_uint4(words[0], words[1], words[2], words[3]);
#endif
}

SPIDR_DEVICE uint32_t pair_of(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

// 16 bytes from global to shared memory without a trip through registers, zeros when !valid (then `source` is
// not read, but must still be a mapped address). Lands by the next wait_async(); groups are issued by commit_async().
SPIDR_DEVICE void copy16_async(uint16_t* destination, const uint16_t* source, bool valid) {
#ifdef SPIDR_EMULATE
  emu::copy16_async(destination, source, valid);
#else
  const uint32_t address = uint32_t(__cvta_generic_to_shared(destination));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(source), "r"(valid ? 16 : 0));
#endif
}

SPIDR_DEVICE void commit_async() {
#ifndef SPIDR_EMULATE
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

SPIDR_DEVICE void wait_async() {  // every committed group has landed (for this thread: sync_block for the others)
#ifdef SPIDR_EMULATE
  emu::wait_async();
#else
  asm volatile("cp.async.wait_group 0;\n" ::);
#endif
}

SPIDR_DEVICE void sync_block() {
#ifdef SPIDR_EMULATE
  emu::sync_block();
#else
  __syncthreads();
#endif
}

SPIDR_DEVICE float shfl_xor(float value, int lane_mask) {
#ifdef SPIDR_EMULATE
  return emu::shfl_xor(value, lane_mask);
#else
  return __shfl_xor_sync(0xffffffffu, value, lane_mask);
#endif
}

// address[0] += first, address[1] += second; address 8-byte aligned. Hopper adds both in one vector atomic (one
// RED.64 instead of two RED.32 a lane), earlier cards in two.
SPIDR_DEVICE void atomic_add_pair(float* address, float first, float second) {
#ifdef SPIDR_EMULATE
  address[0] += first;  // the emulator runs one fiber at a time
  address[1] += second;
#elif __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(address), make_float2(first, second));
#else
  atomicAdd(address, first);
  atomicAdd(address + 1, second);
#endif
}

SPIDR_DEVICE float fast_exp2(float x) {
#ifdef SPIDR_EMULATE
  return emu::exp2(x);
#else
  return exp2f(x);
#endif
}

// D += A·B for one warp: A 16x16 row-major, B 16x8 column-major (16-bit elements), D 16x8 fp32.
// With g = lane / 4 and t = lane % 4, a lane holds
//   a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   d[0], d[1] = D[g][2t, 2t+1]   d[2], d[3] = D[g+8][2t, 2t+1]
// (PTX ISA, "Matrix fragments for mma.m16n8k16 with floating point type").
template <typename Element>
SPIDR_DEVICE void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef SPIDR_EMULATE
  emu::mma_16x8x16(d, a, b, &Element::to_float);
#else
  if constexpr (Element::kIsBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// ldmatrix.x4: lane l gives the address of row l % 8 of 8x8 matrix l / 8 (16-byte aligned rows of 16-bit
// elements in shared memory); register i of lane l receives, from matrix i,
//   plain:      its row l / 4, columns 2(l % 4) and 2(l % 4) + 1      (a fragment of the matrix)
//   Transposed: its rows 2(l % 4) and 2(l % 4) + 1, column l / 4      (a fragment of its transpose)
template <bool Transposed>
SPIDR_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row) {
#ifdef SPIDR_EMULATE
  emu::ldmatrix_x4(r, row, Transposed);
#else
  const uint32_t address = uint32_t(__cvta_generic_to_shared(row));
  if constexpr (Transposed) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  }
#endif
}

SPIDR_DEVICE int thread_index() {
#ifdef SPIDR_EMULATE
  return emu::thread_index();
#else
  return threadIdx.x;
#endif
}

struct BlockIndex {
  int x, y, z;
};

SPIDR_DEVICE BlockIndex block_index() {
#ifdef SPIDR_EMULATE
  auto block = emu::block_coordinates();
  return {block.x, block.y, block.z};
#else
  return {int(blockIdx.x), int(blockIdx.y), int(blockIdx.z)};
#endif
}

SPIDR_DEVICE uint16_t* dynamic_shared_memory() {
#ifdef SPIDR_EMULATE
  return reinterpret_cast<uint16_t*>(emu::shared_memory());
#else
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  return reinterpret_cast<uint16_t*>(shared_bytes);
#endif
}

}  // namespace spidr
