// Forward kernels for head dim 128 (a file per head dim keeps each compile unit small and parallel).
#include "launch_template.h"

namespace spidr {
template void run_forward<Bf16, 128>(const ForwardParams&, uintptr_t);
template void run_forward<Fp16, 128>(const ForwardParams&, uintptr_t);
}  // namespace spidr
