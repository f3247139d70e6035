// Checks of the sft_kernels/csrc/ kernels against a float64 CPU reference, shared by the GPU test
// executable (test_kernels.cu, built by CMakeLists.txt) and the CPU emulation
// (test_emulated.cpp, which runs the same kernel source on fibers).
//
// Before including, define the memory hooks:
//   void* dev_alloc(size_t); void dev_free(void*);
//   void to_dev(void* dst, const void* src, size_t); void from_dev(void* dst, const void* src, size_t);
//   void dev_sync();
// Every output is poisoned (NaN) before a kernel writes it. Attention outputs and gradients
// are held to the suite's rule for fp16/bf16 (tests/helpers.py::assert_close), element by
// element: FlashAttention's bar (max abs error vs float64 at most twice that of the same
// computation in plain low precision, computed here, plus a slack) and a relative error
// ||out - ref|| / ||ref|| of at most 1e-2; the lse to 1e-5 relative with its -inf rows exact.
// Block-diagonal: y to the same rule, dx and dw to the relative error (as
// tests/test_block_diag.py). A non-finite value where the reference is finite fails.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "sft_kernels.h"
#include "swa_kernels.cuh"  // the tile sizes the tile-edge cases are derived from

namespace kt {

using sftk::DType;
constexpr double kTol = 1e-2;      // relative, fp16/bf16 (TOL in tests/helpers.py)
constexpr double kLseTol = 1e-5;   // relative, the fp32 lse
constexpr double kFaAtol = 1e-5;   // FA_ATOL in tests/helpers.py

inline uint16_t to_bits(float f, DType dt) {
  if (dt == DType::kBFloat16) {
    __nv_bfloat16 h = __float2bfloat16_rn(f);
    uint16_t b;
    std::memcpy(&b, &h, 2);
    return b;
  }
  __half h = __float2half_rn(f);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
inline float from_bits(uint16_t b, DType dt) {
  if (dt == DType::kBFloat16) {
    __nv_bfloat16 h;
    std::memcpy(&h, &b, 2);
    return __bfloat162float(h);
  }
  __half h;
  std::memcpy(&h, &b, 2);
  return __half2float(h);
}

// Device buffer of 16-bit values, NaN-poisoned on creation.
struct Buf {
  void* d = nullptr;
  size_t n = 0;
  explicit Buf(size_t n_, size_t elsize = 2) : n(n_) {
    d = dev_alloc(std::max<size_t>(n * elsize, 16));
    std::vector<unsigned char> nan(std::max<size_t>(n * elsize, 16), 0xFF);
    to_dev(d, nan.data(), nan.size());
  }
  Buf(const std::vector<float>& v, DType dt);  // v rounded to dt (upload)
  explicit Buf(const std::vector<int>& v) : Buf(v.size(), 4) { to_dev(d, v.data(), v.size() * 4); }
  ~Buf() { dev_free(d); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

inline void upload(Buf& b, const std::vector<float>& v, DType dt) {
  std::vector<uint16_t> bits(v.size());
  for (size_t i = 0; i < v.size(); ++i) bits[i] = to_bits(v[i], dt);
  to_dev(b.d, bits.data(), bits.size() * 2);
}
inline Buf::Buf(const std::vector<float>& v, DType dt) : Buf(v.size()) { upload(*this, v, dt); }
inline std::vector<float> download(const Buf& b, DType dt) {
  std::vector<uint16_t> bits(b.n);
  from_dev(bits.data(), b.d, b.n * 2);
  std::vector<float> v(b.n);
  for (size_t i = 0; i < b.n; ++i) v[i] = from_bits(bits[i], dt);
  return v;
}
inline std::vector<float> download_f32(const Buf& b) {
  std::vector<float> v(b.n);
  from_dev(v.data(), b.d, b.n * 4);
  return v;
}

// Random values rounded to the dtype, so that the reference sees the kernel's inputs.
inline std::vector<float> randn(size_t n, DType dt, std::mt19937& rng, float scale = 1.f) {
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = from_bits(to_bits(dist(rng), dt), dt);
  return v;
}

struct Report {
  int failures = 0;
  void check(const std::string& what, double err, bool ok_extra = true, double tol = kTol) {
    const bool ok = err <= tol && ok_extra && std::isfinite(err);
    std::printf("  %-44s rel_err %.3e %s\n", what.c_str(), err, ok ? "ok" : "FAIL");
    if (!ok) failures++;
  }
};

// ||out - ref|| / ||ref|| over the entries selected by `idx` (all when empty); -1 if out
// is not finite where ref is.
inline double rel_err(const std::vector<float>& out, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(ref[i])) continue;
    if (!std::isfinite(out[i])) return INFINITY;
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

// ============================================================================== attention
struct AttnCase {
  std::string name;
  int batch, lq, lk, hq, hkv, d;
  int mode, left, right, keys;
  bool causal;
  std::vector<int> seqs_q, seqs_k;  // packed (varlen) when non-empty; batch = size
  int head_pad = 0;                 // extra elements between heads (non-contiguous strides)
  DType dt = DType::kFloat16;
};

inline void resolve(const AttnCase& c, int len_k, int& L, int& R) {
  if (c.mode == sftk::kModeExplicit) {
    L = c.left;
    R = c.right;
    return;
  }
  int w = c.mode == sftk::kModeKeys ? std::min(c.keys, len_k) : static_cast<int>(std::floor(std::sqrt(static_cast<double>(len_k))));
  w = std::max(w, 1);
  if (c.causal) {
    L = w - 1;
    R = 0;
  } else {
    L = w / 2;
    R = (w - 1) / 2;
  }
}

// FlashAttention's bar (tests/helpers.py::assert_fa_bar), element by element: the largest
// |out - ref| at most twice the largest |base - ref| of a plain low-precision computation,
// plus the slack 2 max|rnd(rnd(r + 0.3) - 0.3) - r| (r = ref in the dtype) + 1e-5; and, as
// helpers.assert_close does for the fixed cases, ||out - ref|| / ||ref|| <= 1e-2. `base_err`
// is max|base - ref| (the caller may take a larger one: see the FA design shift below).
inline void check_fa_bar(Report& rep, const std::string& what, const std::vector<float>& out,
                         const std::vector<double>& ref, double base_err, DType dt) {
  double err = 0, slack = 0;
  bool finite = true;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(out[i])) finite = false;
    err = std::max(err, std::fabs(out[i] - ref[i]));
    const float r = from_bits(to_bits(static_cast<float>(ref[i]), dt), dt);
    const float up = from_bits(to_bits(r + 0.3f, dt), dt);
    slack = std::max(slack, std::fabs(static_cast<double>(from_bits(to_bits(up - 0.3f, dt), dt)) - r));
  }
  slack = 2 * slack + kFaAtol;
  const double bar = 2 * base_err + slack, rel = rel_err(out, ref);
  const bool ok = finite && err <= bar && rel <= kTol;
  std::printf("  %-6s max_err %.3e <= 2 x low-precision %.3e + %.1e, rel_err %.3e %s\n", what.c_str(), err, base_err,
              slack, rel, ok ? "ok" : "FAIL");
  if (!ok) rep.failures++;
}

inline double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

inline int run_attention(const AttnCase& c, Report& rep, std::mt19937& rng) {
  const bool varlen = !c.seqs_q.empty();
  const int B = varlen ? static_cast<int>(c.seqs_q.size()) : c.batch;
  std::vector<int> cq(B + 1, 0), ck(B + 1, 0);
  for (int b = 0; b < B; ++b) {
    cq[b + 1] = cq[b] + (varlen ? c.seqs_q[b] : c.lq);
    ck[b + 1] = ck[b] + (varlen ? c.seqs_k[b] : c.lk);
  }
  int max_q = 0, max_k = 0;
  for (int b = 0; b < B; ++b) {
    max_q = std::max(max_q, cq[b + 1] - cq[b]);
    max_k = std::max(max_k, ck[b + 1] - ck[b]);
  }
  const int tq = cq[B], tk = ck[B], D = c.d, HQ = c.hq, HK = c.hkv, G = HQ / HK;
  const int hs = D + c.head_pad;  // head stride (elements)
  // storage: rows (token) x heads x hs, all batches stacked: row stride HQ*hs / HK*hs
  auto qi = [&](int row, int h, int e) { return (static_cast<size_t>(row) * HQ + h) * hs + e; };
  auto ki = [&](int row, int h, int e) { return (static_cast<size_t>(row) * HK + h) * hs + e; };
  std::vector<float> q = randn(static_cast<size_t>(tq) * HQ * hs, c.dt, rng);
  std::vector<float> k = randn(static_cast<size_t>(tk) * HK * hs, c.dt, rng);
  std::vector<float> v = randn(static_cast<size_t>(tk) * HK * hs, c.dt, rng);
  std::vector<float> dout = randn(static_cast<size_t>(tq) * HQ * hs, c.dt, rng);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));

  // ---- kernels
  Buf q_(q, c.dt), k_(k, c.dt), v_(v, c.dt), do_(dout, c.dt), cuq(cq), cuk(ck);
  Buf o_(q.size()), dq_(q.size()), dk_(k.size()), dv_(v.size());  // outputs, NaN until written
  const size_t n_lse = static_cast<size_t>(HQ) * (varlen ? tq : B * c.lq);
  Buf lse_(n_lse, 4), delta_(n_lse, 4);

  sftk::SwaParams p;
  p.dtype = c.dt, p.head_dim = D;
  p.q = q_.d, p.k = k_.d, p.v = v_.d, p.dout = do_.d;
  p.out = o_.d, p.o = o_.d;  // the forward writes O, the backward reads it
  p.lse = static_cast<float*>(lse_.d), p.delta = static_cast<float*>(delta_.d);
  p.dq = dq_.d, p.dk = dk_.d, p.dv = dv_.d;
  const int64_t q_row = static_cast<int64_t>(HQ) * hs, k_row = static_cast<int64_t>(HK) * hs;
  const int64_t q_b = varlen ? 0 : q_row * c.lq, k_b = varlen ? 0 : k_row * c.lk;
  p.stride_qb = p.stride_ob = p.stride_dob = p.stride_dqb = q_b;
  p.stride_qm = p.stride_om = p.stride_dom = p.stride_dqm = q_row;
  p.stride_qh = p.stride_oh = p.stride_doh = p.stride_dqh = hs;
  p.stride_kb = p.stride_vb = p.stride_dkb = p.stride_dvb = k_b;
  p.stride_kn = p.stride_vn = p.stride_dkn = p.stride_dvn = k_row;
  p.stride_kh = p.stride_vh = p.stride_dkh = p.stride_dvh = hs;
  if (varlen) {  // (heads, total)
    p.stride_lb = 0;
    p.stride_lh = tq;
    p.cu_seqlens_q = static_cast<const int*>(cuq.d);
    p.cu_seqlens_k = static_cast<const int*>(cuk.d);
  } else {  // (batch, heads, seqlen)
    p.stride_lb = static_cast<int64_t>(HQ) * c.lq;
    p.stride_lh = c.lq;
  }
  p.batch = B, p.seqlen_q = max_q, p.seqlen_k = max_k;
  p.num_heads = HQ, p.num_kv_heads = HK, p.group = G;
  p.left = c.left, p.right = c.right, p.keys = c.keys, p.window_mode = c.mode, p.causal = c.causal;
  p.sm_scale = static_cast<float>(scale);

  std::printf("%s [%s]\n", c.name.c_str(), c.dt == DType::kBFloat16 ? "bf16" : "fp16");
  cudaError_t err = sftk::swa_forward(p, nullptr);
  dev_sync();
  if (err != cudaSuccess) {
    std::printf("  forward launch failed: %s\n", cudaGetErrorString(err));
    rep.failures++;
    return 1;
  }
  err = sftk::swa_backward(p, nullptr);
  dev_sync();
  if (err != cudaSuccess) {
    std::printf("  backward launch failed: %s\n", cudaGetErrorString(err));
    rep.failures++;
    return 1;
  }
  const std::vector<float> o_got = download(o_, c.dt);

  // ---- float64 reference; beside it, the same computation in the low precision (each op's
  // result rounded to the dtype, fp32 sums: what the tests' plain-PyTorch baseline,
  // reference.py with upcast=False under autograd, computes), and FlashAttention's design
  // shift of dq / dk (tests/test_attention.py::_fa_design_shift): the kernels take delta =
  // rowsum(dO * O) from their own rounded O, which moves dS_ij by P_ij (delta_i - delta'_i).
  auto rnd = [&](float x) { return from_bits(to_bits(x, c.dt), c.dt); };
  const float scale_f = static_cast<float>(scale);
  std::vector<double> o_ref(q.size(), NAN), lse_ref(static_cast<size_t>(HQ) * tq), dq_ref(q.size(), NAN),
      dk_ref(k.size(), NAN), dv_ref(v.size(), NAN), dq_shift(q.size(), 0.0), dk_shift(k.size(), 0.0);
  std::vector<double> o_low(q.size(), NAN), dq_low(q.size(), NAN), dk_low(k.size(), NAN), dv_low(v.size(), NAN);
  // low-precision dK / dV per query head before the group sum (fp32 sums over rows)
  std::vector<float> dk_lh(static_cast<size_t>(tk) * HQ * D, 0.f), dv_lh(static_cast<size_t>(tk) * HQ * D, 0.f);
  auto lhi = [&](int row, int h, int e) { return (static_cast<size_t>(row) * HQ + h) * D + e; };
  for (int row = 0; row < tk; ++row)
    for (int h = 0; h < HK; ++h)
      for (int e = 0; e < D; ++e) dk_ref[ki(row, h, e)] = dv_ref[ki(row, h, e)] = 0;
  for (int b = 0; b < B; ++b) {
    const int lq = cq[b + 1] - cq[b], lk = ck[b + 1] - ck[b], off = lk - lq;
    int L, R;
    resolve(c, lk, L, R);
    for (int h = 0; h < HQ; ++h) {
      const int hk = h / G;
      for (int i = 0; i < lq; ++i) {
        const int qr = cq[b] + i;
        const float* qv = &q[qi(qr, h, 0)];
        const float* dov = &dout[qi(qr, h, 0)];
        std::vector<double> s(lk, -INFINITY);
        std::vector<float> sl(lk, -INFINITY);
        double mx = -INFINITY;
        float mxl = -INFINITY;
        for (int j = 0; j < lk; ++j) {
          const int pos = i + off;
          if ((L >= 0 && j < pos - L) || (R >= 0 && j > pos + R)) continue;
          const float* kv = &k[ki(ck[b] + j, hk, 0)];
          double acc = 0;
          float accl = 0;
          for (int e = 0; e < D; ++e) {
            acc += static_cast<double>(qv[e]) * kv[e];
            accl += qv[e] * kv[e];
          }
          s[j] = acc * scale;
          sl[j] = rnd(rnd(accl) * scale_f);
          mx = std::max(mx, s[j]);
          mxl = std::max(mxl, sl[j]);
        }
        const size_t li = static_cast<size_t>(h) * tq + qr;  // (heads, total) order; remapped below
        for (int e = 0; e < D; ++e) {
          o_ref[qi(qr, h, e)] = dq_ref[qi(qr, h, e)] = 0;
          o_low[qi(qr, h, e)] = dq_low[qi(qr, h, e)] = 0;
        }
        if (mx == -INFINITY) {
          lse_ref[li] = -INFINITY;
          continue;
        }
        double sum = 0;
        float suml = 0;
        for (int j = 0; j < lk; ++j) {
          sum += std::exp(s[j] - mx);
          suml += std::exp(sl[j] - mxl);
        }
        lse_ref[li] = mx + std::log(sum);
        std::vector<double> pr(lk);
        std::vector<float> pl(lk), dpl(lk, 0.f);
        for (int j = 0; j < lk; ++j) {
          pr[j] = std::exp(s[j] - lse_ref[li]);
          pl[j] = rnd(std::exp(sl[j] - mxl) / suml);
        }
        std::vector<float> ol(D, 0.f);
        for (int j = 0; j < lk; ++j)
          if (pr[j] != 0)
            for (int e = 0; e < D; ++e) {
              o_ref[qi(qr, h, e)] += pr[j] * v[ki(ck[b] + j, hk, e)];
              ol[e] += pl[j] * v[ki(ck[b] + j, hk, e)];
            }
        for (int e = 0; e < D; ++e) o_low[qi(qr, h, e)] = rnd(ol[e]);
        double delta = 0, delta_k = 0;  // from the exact O and from the kernel's O
        for (int e = 0; e < D; ++e) {
          delta += static_cast<double>(dov[e]) * o_ref[qi(qr, h, e)];
          delta_k += static_cast<double>(dov[e]) * o_got[qi(qr, h, e)];
        }
        float deltal = 0;
        for (int j = 0; j < lk; ++j) {
          if (pr[j] == 0) continue;
          float dpa = 0;
          for (int e = 0; e < D; ++e) dpa += dov[e] * v[ki(ck[b] + j, hk, e)];
          dpl[j] = rnd(dpa);
          deltal += pl[j] * dpl[j];
        }
        std::vector<float> dql(D, 0.f);
        for (int j = 0; j < lk; ++j) {
          if (pr[j] == 0) continue;
          double dp = 0;
          for (int e = 0; e < D; ++e) dp += static_cast<double>(dov[e]) * v[ki(ck[b] + j, hk, e)];
          const double ds = pr[j] * (dp - delta), shift = scale * pr[j] * (delta - delta_k);
          const float dsl = rnd(rnd(pl[j] * (dpl[j] - deltal)) * scale_f);
          for (int e = 0; e < D; ++e) {
            const size_t kj = ki(ck[b] + j, hk, e);
            dv_ref[kj] += pr[j] * dov[e];
            dq_ref[qi(qr, h, e)] += scale * ds * k[kj];
            dk_ref[kj] += scale * ds * qv[e];
            dq_shift[qi(qr, h, e)] += shift * k[kj];
            dk_shift[kj] += shift * qv[e];
            dv_lh[lhi(ck[b] + j, h, e)] += pl[j] * dov[e];
            dk_lh[lhi(ck[b] + j, h, e)] += dsl * qv[e];
            dql[e] += dsl * k[kj];
          }
        }
        for (int e = 0; e < D; ++e) dq_low[qi(qr, h, e)] = rnd(dql[e]);
      }
    }
  }
  for (int row = 0; row < tk; ++row)  // the group's query heads summed (fp32), rounded once
    for (int hk = 0; hk < HK; ++hk)
      for (int e = 0; e < D; ++e) {
        float sk = 0, sv = 0;
        for (int g = 0; g < G; ++g) {
          sk += rnd(dk_lh[lhi(row, hk * G + g, e)]);
          sv += rnd(dv_lh[lhi(row, hk * G + g, e)]);
        }
        dk_low[ki(row, hk, e)] = rnd(sk);
        dv_low[ki(row, hk, e)] = rnd(sv);
      }

  // Only the head_dim columns are outputs; padding between heads is never written.
  auto valid = [&](const auto& all) {
    std::vector<typename std::decay_t<decltype(all)>::value_type> out;
    for (size_t i = 0; i < all.size(); ++i)
      if (static_cast<int>(i % hs) < D) out.push_back(all[i]);
    return out;
  };
  // dq, dk: the baseline is the further from exact of plain low precision and FlashAttention's
  // design (exact but for its delta), as in tests/test_attention.py
  auto base_err = [&](const std::vector<double>& ref, const std::vector<double>& low, const std::vector<double>* shift) {
    const std::vector<double> r = valid(ref);
    double e = max_abs_diff(valid(low), r);
    if (shift != nullptr)
      for (double x : valid(*shift)) e = std::max(e, std::fabs(x));
    return e;
  };
  check_fa_bar(rep, "out", valid(o_got), valid(o_ref), base_err(o_ref, o_low, nullptr), c.dt);
  // lse: kernel layout -> reference (heads, total) order
  std::vector<float> lse_k = download_f32(lse_);
  std::vector<float> lse_got(lse_ref.size());
  bool inf_ok = true;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < HQ; ++h)
      for (int i = 0; i < cq[b + 1] - cq[b]; ++i) {
        const size_t kidx = varlen ? static_cast<size_t>(h) * tq + cq[b] + i
                                   : (static_cast<size_t>(b) * HQ + h) * c.lq + i;
        const size_t ridx = static_cast<size_t>(h) * tq + cq[b] + i;
        lse_got[ridx] = lse_k[kidx];
        if (std::isinf(lse_ref[ridx]) != (std::isinf(lse_got[ridx]) && lse_got[ridx] < 0)) inf_ok = false;
      }
  rep.check("lse (and -inf rows)", rel_err(lse_got, lse_ref), inf_ok, kLseTol);
  check_fa_bar(rep, "dq", valid(download(dq_, c.dt)), valid(dq_ref), base_err(dq_ref, dq_low, &dq_shift), c.dt);
  check_fa_bar(rep, "dk", valid(download(dk_, c.dt)), valid(dk_ref), base_err(dk_ref, dk_low, &dk_shift), c.dt);
  check_fa_bar(rep, "dv", valid(download(dv_, c.dt)), valid(dv_ref), base_err(dv_ref, dv_low, nullptr), c.dt);
  return 0;
}

// ============================================================================== block-diagonal
struct BdCase {
  std::string name;
  int tokens;
  std::vector<int> in_f, out_f;  // n_i, m_i
  bool bias;
  int row_pad = 0;  // extra elements per activation row (strided x / dy / out)
  DType dt = DType::kFloat16;
  int split = 1;
};

inline int run_block_diag(const BdCase& c, Report& rep, std::mt19937& rng) {
  using namespace sftk;
  const int G = static_cast<int>(c.in_f.size()), T = c.tokens;
  std::vector<int> n_off(G + 1, 0), m_off(G + 1, 0);
  std::vector<int64_t> w_off(G + 1, 0);
  for (int i = 0; i < G; ++i) {
    n_off[i + 1] = n_off[i] + c.in_f[i];
    m_off[i + 1] = m_off[i] + c.out_f[i];
    w_off[i + 1] = w_off[i] + static_cast<int64_t>(c.in_f[i]) * c.out_f[i];
  }
  const int NT = n_off[G], MT = m_off[G];
  const int ldx = NT + c.row_pad, ldy = MT + c.row_pad;
  std::vector<float> x = randn(static_cast<size_t>(T) * ldx, c.dt, rng), w = randn(w_off[G], c.dt, rng, 0.2f),
                     bias = randn(MT, c.dt, rng), dy = randn(static_cast<size_t>(T) * ldy, c.dt, rng);
  std::vector<double> y_ref(static_cast<size_t>(T) * ldy, NAN), dx_ref(static_cast<size_t>(T) * ldx, NAN),
      dw_ref(w_off[G], 0.0);
  // y as plain low precision computes it (reference.py, upcast=False): fp32 sums, the product
  // rounded to the dtype, then the bias added and rounded: FlashAttention's bar's baseline
  std::vector<double> y_low(y_ref.size(), NAN);
  auto rnd = [&](float f) { return from_bits(to_bits(f, c.dt), c.dt); };
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < G; ++i) {
      const int n = c.in_f[i], m = c.out_f[i];
      for (int r = 0; r < m; ++r) {
        double acc = c.bias ? bias[m_off[i] + r] : 0.0;
        float accl = 0.f;
        for (int cc = 0; cc < n; ++cc) {
          acc += static_cast<double>(x[t * ldx + n_off[i] + cc]) * w[w_off[i] + r * n + cc];
          accl += x[t * ldx + n_off[i] + cc] * w[w_off[i] + r * n + cc];
        }
        y_ref[static_cast<size_t>(t) * ldy + m_off[i] + r] = acc;
        y_low[static_cast<size_t>(t) * ldy + m_off[i] + r] = c.bias ? rnd(rnd(accl) + bias[m_off[i] + r]) : rnd(accl);
      }
      for (int cc = 0; cc < n; ++cc) {
        double acc = 0;
        for (int r = 0; r < m; ++r) acc += static_cast<double>(dy[t * ldy + m_off[i] + r]) * w[w_off[i] + r * n + cc];
        dx_ref[static_cast<size_t>(t) * ldx + n_off[i] + cc] = acc;
      }
      for (int r = 0; r < m; ++r)
        for (int cc = 0; cc < n; ++cc)
          dw_ref[w_off[i] + r * n + cc] += static_cast<double>(dy[t * ldy + m_off[i] + r]) * x[t * ldx + n_off[i] + cc];
    }

  // block tables (what sft_kernels/ops/block_diag/cuda_backend.py builds)
  std::vector<int> mf, mx, mw;
  int tf = 0, tx = 0, tw = 0;
  for (int i = 0; i < G; ++i) {
    const int n = c.in_f[i], m = c.out_f[i];
    const int nt_m = (m + kBdBlockN - 1) / kBdBlockN, nt_n = (n + kBdBlockN - 1) / kBdBlockN;
    mf.insert(mf.end(), {n_off[i], m_off[i], n, m, static_cast<int>(w_off[i]), n, tf, 0});
    tf += nt_m;
    mx.insert(mx.end(), {m_off[i], n_off[i], m, n, static_cast<int>(w_off[i]), n, tx, 0});
    tx += nt_n;
    const int mt = (m + kBdBlockM - 1) / kBdBlockM;
    mw.insert(mw.end(), {m_off[i], n_off[i], m, n, static_cast<int>(w_off[i]), 0, tw, nt_n});
    tw += mt * nt_n;
  }
  Buf x_(x, c.dt), w_(w, c.dt), b_(bias, c.dt), dy_(dy, c.dt), meta_f(mf), meta_x(mx), meta_w(mw);
  Buf y_(y_ref.size()), dx_(dx_ref.size());  // outputs, NaN until written
  const int split = c.split;
  const int64_t t_chunk = ((T + split - 1) / split + kBdBlockK - 1) / kBdBlockK * kBdBlockK;
  const int eff_split = std::max<int>(1, static_cast<int>((T + t_chunk - 1) / t_chunk));
  Buf dw_(eff_split > 1 ? w.size() * eff_split : w.size(), eff_split > 1 ? 4 : 2);  // fp32 partials

  std::printf("%s [%s]\n", c.name.c_str(), c.dt == DType::kBFloat16 ? "bf16" : "fp16");
  BdGemmParams f;  // y = x W^T + bias
  f.dtype = c.dt, f.num_groups = G, f.tokens = T;
  f.a = x_.d, f.lda = ldx;
  f.w = w_.d, f.bias = c.bias ? b_.d : nullptr;
  f.out = y_.d, f.ldo = ldy;
  f.meta = static_cast<const int*>(meta_f.d), f.total_tiles_n = tf, f.trans_w = false;
  cudaError_t err = bd_gemm(f, nullptr);
  BdGemmParams dxp = f;  // dx = dy W
  dxp.a = dy_.d, dxp.lda = ldy, dxp.bias = nullptr;
  dxp.out = dx_.d, dxp.ldo = ldx;
  dxp.meta = static_cast<const int*>(meta_x.d), dxp.total_tiles_n = tx, dxp.trans_w = true;
  if (err == cudaSuccess) err = bd_gemm(dxp, nullptr);
  BdDwParams wp;  // dW = dy^T x
  wp.dtype = c.dt, wp.num_groups = G, wp.tokens = T;
  wp.dy = dy_.d, wp.ld_dy = ldy;
  wp.x = x_.d, wp.ld_x = ldx;
  wp.dw = dw_.d, wp.dw_fp32 = eff_split > 1, wp.stride_split = w_off[G];
  wp.meta = static_cast<const int*>(meta_w.d), wp.total_tiles = tw;
  wp.t_chunk = t_chunk, wp.split = eff_split;
  if (err == cudaSuccess) err = bd_dw(wp, nullptr);
  dev_sync();
  if (err != cudaSuccess) {
    std::printf("  launch failed: %s\n", cudaGetErrorString(err));
    rep.failures++;
    return 1;
  }
  auto strip = [](const std::vector<float>& got, const std::vector<double>& ref, std::vector<double>& r2) {
    std::vector<float> g2;  // entries the op defines (not the row padding)
    r2.clear();
    for (size_t i = 0; i < ref.size(); ++i)
      if (!std::isnan(ref[i])) {
        g2.push_back(got[i]);
        r2.push_back(ref[i]);
      }
    return g2;
  };
  std::vector<double> r, rl;
  std::vector<float> g = strip(download(y_, c.dt), y_ref, r);
  strip(std::vector<float>(y_ref.size()), y_low, rl);
  check_fa_bar(rep, "y", g, r, max_abs_diff(rl, r), c.dt);
  g = strip(download(dx_, c.dt), dx_ref, r);
  rep.check("dx", rel_err(g, r));
  std::vector<float> dw_got(w.size());
  if (eff_split > 1) {
    std::vector<float> parts = download_f32(dw_);
    for (size_t i = 0; i < w.size(); ++i) {
      float s = 0;
      for (int sp = 0; sp < eff_split; ++sp) s += parts[sp * w.size() + i];
      dw_got[i] = s;
    }
  } else {
    dw_got = download(dw_, c.dt);
  }
  rep.check("dw (split " + std::to_string(eff_split) + ")", rel_err(dw_got, dw_ref));
  return 0;
}

// ============================================================================== cases
// Tile edges (issue 20). A key range (forward, dQ: key_phases) or query range (dK/dV:
// query_phases) one row short or a tile late loses work only where the band's edge sits on
// a tile boundary: left - (Lk - Lq) = 0, 1 or tile - 1 modulo a tile size (the dK/dV query
// range one row short put dk off by 2.1e-2 at L = 128, D = 128, window (33, 0), which no
// case met). For each tile size m of the kernels at head_dim D (read from swa_kernels.cuh,
// so the cases move with the tiles), left - (Lk - Lq) = m - 1, m, m + 1, each in one of the
// variants (rotated), at a length where a query tile starts past the band's start.
struct EdgeVariant {
  const char* name;
  int off;   // Lk - Lq
  int form;  // 0: causal (t, 0); 1: (t + off, t - off); 2: 2 (t + off) keys; 3: 2 (t + off) + 1 keys
};
constexpr EdgeVariant kEdgeVariants[] = {
    {"causal", 0, 0},   {"two_sided_k_longer", 9, 1}, {"two_sided_q_longer", -9, 1}, {"int_even", 0, 2},
    {"int_even_k_longer", 9, 2}, {"int_odd", 0, 3}, {"int_odd_q_longer", -9, 3},
};

template <int D>
inline std::vector<int> swa_tile_sizes() {
  namespace s = sftk::swa;
  std::vector<int> t = {s::kFwdBM, s::kFwdBN, s::DkdvCfg<D>::BM, s::kDkdvBN, s::kDqBM, s::kDqBN};
  std::sort(t.begin(), t.end());
  t.erase(std::unique(t.begin(), t.end()), t.end());
  return t;
}

// `n` counts the cases made so far: the variant, heads and dtype rotate with it, except that
// the cases at m + 1 (where a range one row short or a tile late loses work) are fp16, whose
// finer rounding leaves a lost row's contribution further above the bar than bf16 does.
inline void add_tile_edge_cases(std::vector<AttnCase>& cs, int d, const std::vector<int>& sizes, int& n) {
  constexpr int E = sftk::kModeExplicit, K = sftk::kModeKeys;
  const int longest = sizes.back();
  for (int dr : {-1, 0, 1})
    for (int m : sizes) {
      const int t = m + dr;
      const EdgeVariant& v = kEdgeVariants[n % 7];
      const int keys = v.form >= 2 ? 2 * (t + v.off) + (v.form == 3) : 0;
      int lq = t + longest + 11;
      if (keys) lq = std::max(lq, keys - v.off + 3);  // W <= Lk: not clamped
      const int left = v.form == 0 ? t : t + v.off, right = v.form == 0 ? 0 : t - v.off;
      const std::string name = "edge" + std::to_string(t) + "_" + std::to_string(t % m) + "mod" + std::to_string(m) +
                               "_" + v.name + "_d" + std::to_string(d);
      cs.push_back({name, 1, lq, lq + v.off, n % 2 ? 1 : 2, 1, d, keys ? K : E, keys ? -1 : left, keys ? -1 : right,
                    keys, v.form == 0, {}, {}, 0, n % 2 && dr != 1 ? DType::kBFloat16 : DType::kFloat16});
      ++n;
    }
}

// `big` adds the longer shapes only a GPU runs quickly.
inline std::vector<AttnCase> attention_cases(bool big) {
  constexpr int E = sftk::kModeExplicit, K = sftk::kModeKeys, S = sftk::kModeSqrt;  // window modes
  std::vector<AttnCase> cs;
  for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
    cs.push_back({"causal_w16_d64_gqa", 1, 130, 130, 4, 2, 64, E, 15, 0, 0, true, {}, {}, 0, dt});
    cs.push_back({"two_sided_3_17_d128", 1, 97, 97, 2, 1, 128, E, 3, 17, 0, false, {}, {}, 0, dt});
  }
  DType h = DType::kFloat16, bf = DType::kBFloat16;
  cs.push_back({"full_d64", 2, 97, 97, 2, 2, 64, E, -1, -1, 0, false, {}, {}, 0, h});
  cs.push_back({"causal_unbounded_d64", 1, 97, 97, 2, 2, 64, E, -1, 0, 0, true, {}, {}, 0, bf});
  cs.push_back({"diag_only_d64", 1, 70, 70, 2, 2, 64, E, 0, 0, 0, false, {}, {}, 0, h});
  cs.push_back({"left_only_unbounded_right_d64", 1, 97, 97, 1, 1, 64, E, 9, -1, 0, false, {}, {}, 0, bf});
  cs.push_back({"int_window_bidir_d64", 1, 97, 97, 2, 2, 64, K, -1, -1, 9, false, {}, {}, 0, h});
  cs.push_back({"q_shorter_causal_d64", 2, 33, 97, 2, 2, 64, E, 16, 0, 0, true, {}, {}, 0, h});
  cs.push_back({"q_longer_causal_empty_rows_d64", 1, 97, 33, 2, 2, 64, E, -1, 0, 0, true, {}, {}, 0, bf});
  cs.push_back({"q_longer_window_d128_mqa", 1, 90, 45, 2, 1, 128, E, 5, 3, 0, false, {}, {}, 0, h});
  cs.push_back({"strided_heads_d64", 1, 80, 80, 2, 1, 64, E, 20, 0, 0, true, {}, {}, 16, bf});
  cs.push_back({"varlen_sqrt_causal_d64", 0, 0, 0, 2, 1, 64, S, -1, -1, 0, true, {70, 0, 129, 5}, {70, 0, 129, 5}, 0, bf});
  cs.push_back({"varlen_keys_bidir_d128", 0, 0, 0, 2, 2, 128, K, -1, -1, 24, false, {40, 100}, {60, 100}, 0, h});
  // >= 3 key tiles per query tile (forward, dQ) and >= 3 query tiles per key tile (dK/dV):
  // the double buffers are reused, so a prefetch that overtakes a barrier overwrites a
  // stage another warp still reads (EMU_SCHED=runahead shows it)
  cs.push_back({"full_L200_three_tiles_d64", 1, 200, 200, 2, 2, 64, E, -1, -1, 0, false, {}, {}, 0, h});
  cs.push_back({"causal_L230_three_tiles_d128_gqa", 1, 230, 230, 4, 2, 128, E, -1, 0, 0, true, {}, {}, 0, bf});
  int n = 0;
  add_tile_edge_cases(cs, 64, swa_tile_sizes<64>(), n);
  add_tile_edge_cases(cs, 128, swa_tile_sizes<128>(), n);
  if (big) {
    cs.push_back({"long_causal_w256_d128", 2, 1025, 1025, 8, 2, 128, E, 255, 0, 0, true, {}, {}, 0, bf});
    cs.push_back({"long_sqrt_bidir_d64", 1, 2048, 2048, 4, 4, 64, S, -1, -1, 0, false, {}, {}, 0, h});
  }
  return cs;
}

inline std::vector<BdCase> block_diag_cases(bool big) {
  std::vector<BdCase> cs;
  DType h = DType::kFloat16, bf = DType::kBFloat16;
  cs.push_back({"equal_blocks_aligned_bias", 70, {64, 64, 64}, {32, 32, 32}, true, 0, h, 1});
  cs.push_back({"unequal_blocks_odd_sizes", 45, {7, 130, 1, 33}, {5, 17, 140, 1}, true, 0, bf, 1});
  cs.push_back({"strided_rows_split3", 100, {40, 24}, {136, 8}, false, 8, h, 3});
  cs.push_back({"odd_row_pad_bf16_split2", 50, {16, 9}, {24, 200}, true, 3, bf, 2});
  if (big) cs.push_back({"big_4x512", 4096, {512, 512, 512, 512}, {512, 512, 512, 512}, true, 0, bf, 4});
  return cs;
}

// Every case whose name contains `filter` (big: the GPU driver's longer cases too); prints
// PASSED / FAILED and returns the number of failures. Both drivers' main.
inline int run_all(const char* filter, bool big) {
  std::mt19937 rng(0);
  Report rep;
  for (const auto& c : attention_cases(big))
    if (std::strstr(c.name.c_str(), filter)) run_attention(c, rep, rng);
  for (const auto& c : block_diag_cases(big))
    if (std::strstr(c.name.c_str(), filter)) run_block_diag(c, rep, rng);
  std::printf("%s: %d failure(s)\n", rep.failures ? "FAILED" : "PASSED", rep.failures);
  return rep.failures;
}

}  // namespace kt
