// CPU-emulation shim for <cuda_fp16.h>: storage types and round-to-nearest conversions.
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t x;
};
struct __half2 {
  __half x, y;
};
inline __half __float2half_rn(float f) {
  _Float16 h = static_cast<_Float16>(f);  // IEEE round-to-nearest-even
  __half r;
  std::memcpy(&r.x, &h, 2);
  return r;
}
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.x, 2);
  return static_cast<float>(v);
}
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
