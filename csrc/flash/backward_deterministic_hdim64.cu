// Deterministic-mode backward kernels for head dim 64 (a file of their own: nvcc builds it beside the others).
#include "launch_template.h"

namespace spidr {
template void run_backward_deterministic<Bf16, 64>(const BackwardParams&, uintptr_t);
template void run_backward_deterministic<Fp16, 64>(const BackwardParams&, uintptr_t);
}  // namespace spidr
