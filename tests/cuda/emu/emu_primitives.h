// The tensor-core primitives of mma.cuh for the CPU emulation (SFTK_EMULATE): included
// inside namespace sftk in place of the inline PTX. Semantics follow the PTX ISA
// fragment layouts; the work happens in emu.h.

template <typename T>
struct Dtype;

template <>
struct Dtype<__half> {
  static inline uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(__float2half_rn(lo).x) | (static_cast<uint32_t>(__float2half_rn(hi).x) << 16);
  }
  static inline float to_float(__half x) { return __half2float(x); }
  static inline __half from_float(float x) { return __float2half_rn(x); }
  static inline void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    ::emu::mma_f16(c, a, b0, b1, false);
  }
};

template <>
struct Dtype<__nv_bfloat16> {
  static inline uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(__float2bfloat16_rn(lo).x) |
           (static_cast<uint32_t>(__float2bfloat16_rn(hi).x) << 16);
  }
  static inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static inline __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static inline void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    ::emu::mma_f16(c, a, b0, b1, true);
  }
};

inline void ldmatrix_x4(uint32_t r[4], const void* p) { ::emu::ldmatrix_x4(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t r[4], const void* p) { ::emu::ldmatrix_x4(r, p, true); }
inline void cp_async_16(void* s, const void* g, int src_bytes) { ::emu::cp_async_16(s, g, src_bytes); }
inline void cp_async_commit() {}
inline void cp_async_wait_all() { ::emu::cp_async_wait_all(); }

#define SFTK_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dynamic_smem()
#define SFTK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::emu::launch(kernel, dim3(grid), dim3(block), smem, __VA_ARGS__)
template <typename Kernel>
inline cudaError_t set_max_dynamic_smem(Kernel, size_t bytes) {
  ::emu::set_max_dynamic_smem(bytes);
  return cudaSuccess;
}
