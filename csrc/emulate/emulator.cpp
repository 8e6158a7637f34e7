// Fibers switch by _setjmp/_longjmp between stacks, which glibc's fortified longjmp rejects as a jump into an
// "uninitialized stack frame": fortification is off for this file (it must come before any system header).
#undef _FORTIFY_SOURCE
#include "emulator.h"

#include <setjmp.h>
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

// A fiber starts on its own stack through ucontext (once per block), then switches by _setjmp/_longjmp, which do
// not save the signal mask: swapcontext's sigprocmask system call on every switch was most of the emulator's time.
struct Fiber {
  ucontext_t start;
  jmp_buf resume;  // where the fiber left off, at a barrier
  bool started = false;
  std::vector<char> stack;
  std::vector<PendingCopy> pending;  // cp.async issued, not yet waited for
  bool done = false;
  Barrier* waiting_on = nullptr;
  uint64_t waiting_generation = 0;
};

struct Exchange {  // what the lanes of one warp-wide instruction share
  float shuffled[kWarpSize];     // a lane's shfl value
  float a[16][16], b[16][8];     // an mma's operands, each lane's fragment decoded as the lane arrives
  uint16_t rows[kWarpSize][8];   // the matrix row each lane's ldmatrix address points at, read as the lane arrives
};

// Warp-wide instructions take one barrier each: they alternate between two exchange areas by the barrier's
// generation, and a lane can only write the area of instruction n + 2 after every lane has reached the barrier of
// n + 1, that is after every lane has read what instruction n left there.
struct Warp {
  Barrier barrier;
  Exchange exchange[2];
};

struct Block {
  const std::function<void()>* body = nullptr;
  BlockCoordinates coordinates{};
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<unsigned char> shared;
  Barrier barrier;
  jmp_buf scheduler;  // where run_block resumes when the running fiber waits or finishes
  int current = 0;
};

Block* active = nullptr;

void fiber_main() {
  Block& block = *active;
  (*block.body)();
  wait_async();  // a kernel may leave copies in flight; they still land
  block.fibers[block.current].done = true;
  _longjmp(block.scheduler, 1);  // never returns: the start context has no uc_link
}

// The running fiber gives the CPU back to run_block; returns when run_block resumes it.
[[gnu::noinline]] void yield_to_scheduler(Fiber& fiber) {
  if (_setjmp(fiber.resume) == 0) _longjmp(active->scheduler, 1);
}

// run_block runs `fiber` until it waits or finishes.
[[gnu::noinline]] void resume(Block& block, Fiber& fiber) {
  if (_setjmp(block.scheduler) != 0) return;
  if (!fiber.started) {
    fiber.started = true;
    setcontext(&fiber.start);
  }
  _longjmp(fiber.resume, 1);
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
  yield_to_scheduler(fiber);
}

Warp& my_warp() { return active->warps[active->current / kWarpSize]; }
// The exchange area of the warp-wide instruction the calling lane enters.
Exchange& my_exchange(Warp& warp) { return warp.exchange[warp.barrier.generation & 1]; }
int my_lane() { return active->current % kWarpSize; }

void run_block(Block& block) {
  for (Fiber& fiber : block.fibers) {
    fiber.done = false;
    fiber.started = false;
    fiber.waiting_on = nullptr;
    getcontext(&fiber.start);
    fiber.start.uc_stack.ss_sp = fiber.stack.data();
    fiber.start.uc_stack.ss_size = fiber.stack.size();
    fiber.start.uc_link = nullptr;
    makecontext(&fiber.start, fiber_main, 0);
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
      resume(block, fiber);
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
  Exchange& exchange = my_exchange(warp);
  int lane = my_lane();
  exchange.shuffled[lane] = value;
  wait(warp.barrier);
  return exchange.shuffled[lane ^ lane_mask];
}

void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], float (*to_float)(uint16_t)) {
  Warp& warp = my_warp();
  Exchange& exchange = my_exchange(warp);
  int lane = my_lane();
  // The lane's fragments (see mma_16x8x16 in platform.h): A[g + 8·(i % 2)][2t + 8·(i / 2) + {0, 1}] in a[i],
  // B[2t + 8·j + {0, 1}][g] in b[j].
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    float* a_pair = &exchange.a[g + 8 * (i % 2)][2 * t + 8 * (i / 2)];
    a_pair[0] = to_float(uint16_t(a[i] & 0xffffu));
    a_pair[1] = to_float(uint16_t(a[i] >> 16));
  }
  for (int j = 0; j < 2; ++j) {
    exchange.b[2 * t + 8 * j][g] = to_float(uint16_t(b[j] & 0xffffu));
    exchange.b[2 * t + 8 * j + 1][g] = to_float(uint16_t(b[j] >> 16));
  }
  wait(warp.barrier);
  for (int i = 0; i < 4; ++i) {
    int row = g + (i >= 2 ? 8 : 0), column = 2 * t + i % 2;
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) sum += exchange.a[row][k] * exchange.b[k][column];
    d[i] += sum;
  }
}

void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row, bool transposed) {
  Warp& warp = my_warp();
  Exchange& exchange = my_exchange(warp);
  int lane = my_lane();
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {  // a kernel bug; exceptions cannot leave a fiber
    std::fprintf(stderr, "emulator: ldmatrix row address not 16-byte aligned\n");
    std::abort();
  }
  std::memcpy(exchange.rows[lane], row, 16);
  wait(warp.barrier);
  for (int i = 0; i < 4; ++i) {
    const uint16_t(*matrix)[8] = exchange.rows + 8 * i;
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
