// GPU test of the sft_kernels/csrc/ kernels against the float64 CPU reference (kernel_tests.h).
// Built by CMakeLists.txt as `sft_kernels_test`; run on a machine with an sm_80+ GPU:
//   ./sft_kernels_test [name-substring]
// Exit status 0 when every case is within tolerance (and every output was written).
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "sft_kernels.h"

static void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(2);
  }
}
void* dev_alloc(size_t n) {
  void* p = nullptr;
  check(cudaMalloc(&p, n), "cudaMalloc");
  return p;
}
void dev_free(void* p) { cudaFree(p); }
void to_dev(void* d, const void* h, size_t n) { check(cudaMemcpy(d, h, n, cudaMemcpyHostToDevice), "H2D"); }
void from_dev(void* h, const void* d, size_t n) { check(cudaMemcpy(h, d, n, cudaMemcpyDeviceToHost), "D2H"); }
void dev_sync() { check(cudaDeviceSynchronize(), "kernel execution"); }

#include "kernel_tests.h"

int main(int argc, char** argv) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("no CUDA device: nothing to test\n");
    return 77;  // ctest SKIP_RETURN_CODE
  }
  return kt::run_all(argc > 1 ? argv[1] : "", true) ? 1 : 0;
}
