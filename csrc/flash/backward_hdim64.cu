// Backward kernels for head dim 64.
#include "launch_template.h"

namespace spidr {
template void run_backward<Bf16, 64>(const BackwardParams&, uintptr_t);
template void run_backward<Fp16, 64>(const BackwardParams&, uintptr_t);
}  // namespace spidr
