// Backward kernels for head dim 128.
#include "launch_template.h"

namespace spidr {
template void run_backward<Bf16, 128>(const BackwardParams&, uintptr_t);
template void run_backward<Fp16, 128>(const BackwardParams&, uintptr_t);
}  // namespace spidr
