#include "emulator.h"

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace spidr::emu {
namespace {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;

struct Barrier {
  int count = 0;
  int arrived = 0;
  uint64_t generation = 0;
};

struct PendingCopy {
  uint16_t* destination;
  const uint16_t* source;  // nullptr: zero fill
};

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  std::vector<PendingCopy> pending;  // cp.async issued, not yet waited for
  bool done = false;
  Barrier* waiting_on = nullptr;
  uint64_t waiting_generation = 0;
};

struct Warp {
  Barrier barrier;
  uint32_t words[kWarpSize][6];  // a lane's operands of a warp-wide instruction
  const uint16_t* rows[kWarpSize];  // the row addresses of an ldmatrix
};

struct Block {
  const std::function<void()>* body = nullptr;
  BlockCoordinates coordinates{};
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<unsigned char> shared;
  Barrier barrier;
  ucontext_t scheduler;
  int current = 0;
};

Block* active = nullptr;

void fiber_main() {
  Block& block = *active;
  (*block.body)();
  wait_async();  // a kernel may leave copies in flight; they still land
  block.fibers[block.current].done = true;  // returning resumes the scheduler (uc_link)
}

void wait(Barrier& barrier) {
  Block& block = *active;
  uint64_t generation = barrier.generation;
  if (++barrier.arrived == barrier.count) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  Fiber& fiber = block.fibers[block.current];
  fiber.waiting_on = &barrier;
  fiber.waiting_generation = generation;
  swapcontext(&fiber.context, &block.scheduler);
}

Warp& my_warp() { return active->warps[active->current / kWarpSize]; }
int my_lane() { return active->current % kWarpSize; }

void run_block(Block& block) {
  for (Fiber& fiber : block.fibers) {
    fiber.done = false;
    fiber.waiting_on = nullptr;
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack.data();
    fiber.context.uc_stack.ss_size = fiber.stack.size();
    fiber.context.uc_link = &block.scheduler;
    makecontext(&fiber.context, fiber_main, 0);
  }
  size_t remaining = block.fibers.size();
  while (remaining > 0) {
    bool progressed = false;
    for (size_t i = 0; i < block.fibers.size(); ++i) {
      Fiber& fiber = block.fibers[i];
      if (fiber.done) continue;
      if (fiber.waiting_on != nullptr && fiber.waiting_on->generation == fiber.waiting_generation) continue;
      fiber.waiting_on = nullptr;
      block.current = int(i);
      swapcontext(&block.scheduler, &fiber.context);
      progressed = true;
      if (fiber.done) --remaining;
    }
    if (!progressed) throw std::runtime_error("emulator: deadlock, threads wait at a barrier some never reach");
  }
}

}  // namespace

void launch(Dim3 grid, Dim3 block_dim, size_t shared_bytes, const std::function<void()>& body) {
  unsigned threads = block_dim.x * block_dim.y * block_dim.z;
  if (threads % kWarpSize != 0) throw std::runtime_error("emulator: block size must be whole warps");
  Block block;
  block.body = &body;
  block.fibers.resize(threads);
  for (Fiber& fiber : block.fibers) fiber.stack.resize(kStackBytes);
  block.warps.resize(threads / kWarpSize);
  for (Warp& warp : block.warps) warp.barrier.count = kWarpSize;
  block.barrier.count = int(threads);
  block.shared.resize(shared_bytes + 16);
  Block* previous = active;
  active = &block;
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          block.coordinates = {int(x), int(y), int(z)};
          std::memset(block.shared.data(), 0xff, block.shared.size());  // stale shared memory is not zero
          run_block(block);
        }
  } catch (...) {
    active = previous;
    throw;
  }
  active = previous;
}

int thread_index() { return active->current; }
BlockCoordinates block_coordinates() { return active->coordinates; }
unsigned char* shared_memory() {
  auto address = reinterpret_cast<uintptr_t>(active->shared.data());
  return active->shared.data() + ((16 - address % 16) % 16);
}
void sync_block() { wait(active->barrier); }

void copy16_async(uint16_t* destination, const uint16_t* source, bool valid) {
  active->fibers[active->current].pending.push_back({destination, valid ? source : nullptr});
}

void wait_async() {
  auto& pending = active->fibers[active->current].pending;
  for (const PendingCopy& copy : pending) {
    if (copy.source) {
      std::memcpy(copy.destination, copy.source, 16);
    } else {
      std::memset(copy.destination, 0, 16);
    }
  }
  pending.clear();
}

float shfl_xor(float value, int lane_mask) {
  Warp& warp = my_warp();
  int lane = my_lane();
  std::memcpy(&warp.words[lane][0], &value, 4);
  wait(warp.barrier);
  float partner;
  std::memcpy(&partner, &warp.words[lane ^ lane_mask][0], 4);
  wait(warp.barrier);
  return partner;
}

void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], float (*to_float)(uint16_t)) {
  Warp& warp = my_warp();
  int lane = my_lane();
  for (int i = 0; i < 4; ++i) warp.words[lane][i] = a[i];
  warp.words[lane][4] = b[0];
  warp.words[lane][5] = b[1];
  wait(warp.barrier);
  // The element at (row, k) of A and (k, column) of B, found in the lane and register that hold it.
  auto half = [](uint32_t word, int k) { return uint16_t(k % 2 ? word >> 16 : word & 0xffffu); };
  auto a_at = [&](int row, int k) {
    int holder = (row % 8) * 4 + (k % 8) / 2;
    int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return to_float(half(warp.words[holder][reg], k));
  };
  auto b_at = [&](int k, int column) {
    int holder = column * 4 + (k % 8) / 2;
    return to_float(half(warp.words[holder][4 + (k >= 8 ? 1 : 0)], k));
  };
  int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    int row = g + (i >= 2 ? 8 : 0), column = 2 * t + i % 2;
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) sum += a_at(row, k) * b_at(k, column);
    d[i] += sum;
  }
  wait(warp.barrier);
}

void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row, bool transposed) {
  Warp& warp = my_warp();
  int lane = my_lane();
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {  // a kernel bug; exceptions cannot leave a fiber
    std::fprintf(stderr, "emulator: ldmatrix row address not 16-byte aligned\n");
    std::abort();
  }
  warp.rows[lane] = row;
  wait(warp.barrier);
  for (int i = 0; i < 4; ++i) {
    const uint16_t* const* matrix = warp.rows + 8 * i;
    uint16_t lo, hi;
    if (transposed) {
      lo = matrix[2 * (lane % 4)][lane / 4];
      hi = matrix[2 * (lane % 4) + 1][lane / 4];
    } else {
      lo = matrix[lane / 4][2 * (lane % 4)];
      hi = matrix[lane / 4][2 * (lane % 4) + 1];
    }
    r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  wait(warp.barrier);
}

uint16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

uint16_t float_to_fp16(float value) {
  _Float16 half = static_cast<_Float16>(value);  // round to nearest even, subnormals and overflow included
  uint16_t bits;
  std::memcpy(&bits, &half, 2);
  return bits;
}

float fp16_to_float(uint16_t bits) {
  _Float16 half;
  std::memcpy(&half, &bits, 2);
  return static_cast<float>(half);
}

}  // namespace spidr::emu
