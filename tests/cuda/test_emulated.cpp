// Runs the CUDA kernels of sft_kernels/csrc/ on the CPU through the fiber emulator (emu/emu.h) and
// checks them against the float64 reference of kernel_tests.h. For machines without a
// GPU; tests/test_cuda_build.py builds and runs it:
//   g++ -std=c++17 -O2 -DSFTK_EMULATE -Itests/cuda/emu -Isft_kernels/csrc tests/cuda/test_emulated.cpp -o emu_test
//   ./emu_test [name-substring]       (EMU_SEED=n, EMU_CP_ASYNC=immediate|deferred)
// What it proves: the index math, fragment layouts (as the PTX ISA defines them),
// masking, pipelining and reductions of the kernel source. What it cannot: the
// compiler's code generation and real hardware timing.
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

#include "block_diag.cu"
#include "swa_api.cu"
#include "swa_bwd_d128.cu"
#include "swa_bwd_d64.cu"
#include "swa_fwd_d128.cu"
#include "swa_fwd_d64.cu"
#include "emu/emu.h"

void* dev_alloc(size_t n) { return std::aligned_alloc(256, (n + 255) / 256 * 256); }
void dev_free(void* p) { std::free(p); }
void to_dev(void* d, const void* h, size_t n) { std::memcpy(d, h, n); }
void from_dev(void* h, const void* d, size_t n) { std::memcpy(h, d, n); }
void dev_sync() {}

#include "kernel_tests.h"

int main(int argc, char** argv) { return kt::run_all(argc > 1 ? argv[1] : "", false) ? 1 : 0; }
