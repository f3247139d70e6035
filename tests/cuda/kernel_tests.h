// Checks of the sft_kernels/csrc/ kernels against a float64 CPU reference, shared by the GPU test
// executable (test_kernels.cu, built by CMakeLists.txt) and the CPU emulation
// (test_emulated.cpp, which runs the same kernel source on fibers).
//
// Before including, define the memory hooks:
//   void* dev_alloc(size_t); void dev_free(void*);
//   void to_dev(void* dst, const void* src, size_t); void from_dev(void* dst, const void* src, size_t);
//   void dev_sync();
// Every output is poisoned (NaN) before a kernel writes it; a case fails on a relative
// error ||out - ref|| / ||ref|| over 1e-2 (fp16/bf16, the TOL table of tests/helpers.py),
// on a non-finite value where the reference is finite, or on an lse -inf mismatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "sft_kernels.h"

namespace kt {

using sftk::DType;
constexpr double kTol = 1e-2;

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
  ~Buf() { dev_free(d); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

inline void upload(Buf& b, const std::vector<float>& v, DType dt) {
  std::vector<uint16_t> bits(v.size());
  for (size_t i = 0; i < v.size(); ++i) bits[i] = to_bits(v[i], dt);
  to_dev(b.d, bits.data(), bits.size() * 2);
}
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

  // ---- float64 reference
  std::vector<double> o_ref(q.size(), NAN), lse_ref(static_cast<size_t>(HQ) * tq), dq_ref(q.size(), NAN),
      dk_ref(k.size(), NAN), dv_ref(v.size(), NAN);
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
        std::vector<double> s(lk, -INFINITY);
        double mx = -INFINITY;
        for (int j = 0; j < lk; ++j) {
          const int pos = i + off;
          if ((L >= 0 && j < pos - L) || (R >= 0 && j > pos + R)) continue;
          double acc = 0;
          for (int e = 0; e < D; ++e) acc += static_cast<double>(q[qi(qr, h, e)]) * k[ki(ck[b] + j, hk, e)];
          s[j] = acc * scale;
          mx = std::max(mx, s[j]);
        }
        const size_t li = static_cast<size_t>(h) * tq + qr;  // (heads, total) order; remapped below
        for (int e = 0; e < D; ++e) o_ref[qi(qr, h, e)] = 0, dq_ref[qi(qr, h, e)] = 0;
        if (mx == -INFINITY) {
          lse_ref[li] = -INFINITY;
          continue;
        }
        double sum = 0;
        for (int j = 0; j < lk; ++j) sum += std::exp(s[j] - mx);
        lse_ref[li] = mx + std::log(sum);
        std::vector<double> p(lk);
        for (int j = 0; j < lk; ++j) p[j] = std::exp(s[j] - lse_ref[li]);
        for (int j = 0; j < lk; ++j)
          if (p[j] != 0)
            for (int e = 0; e < D; ++e) o_ref[qi(qr, h, e)] += p[j] * v[ki(ck[b] + j, hk, e)];
        double delta = 0;
        for (int e = 0; e < D; ++e) delta += static_cast<double>(dout[qi(qr, h, e)]) * o_ref[qi(qr, h, e)];
        for (int j = 0; j < lk; ++j) {
          if (p[j] == 0) continue;
          double dp = 0;
          for (int e = 0; e < D; ++e) dp += static_cast<double>(dout[qi(qr, h, e)]) * v[ki(ck[b] + j, hk, e)];
          const double ds = p[j] * (dp - delta);
          for (int e = 0; e < D; ++e) {
            dv_ref[ki(ck[b] + j, hk, e)] += p[j] * dout[qi(qr, h, e)];
            dq_ref[qi(qr, h, e)] += scale * ds * k[ki(ck[b] + j, hk, e)];
            dk_ref[ki(ck[b] + j, hk, e)] += scale * ds * q[qi(qr, h, e)];
          }
        }
      }
    }
  }

  // ---- kernels
  Buf dq_(q.size()), dk_(k.size()), dv_(v.size()), do_(q.size()), q_(q.size()), k_(k.size()), v_(v.size()),
      o_(q.size());
  const size_t n_lse = static_cast<size_t>(HQ) * (varlen ? tq : B * c.lq);
  Buf lse_(n_lse, 4), delta_(n_lse, 4), cuq(B + 1, 4), cuk(B + 1, 4);
  upload(q_, q, c.dt);
  upload(k_, k, c.dt);
  upload(v_, v, c.dt);
  upload(do_, dout, c.dt);
  to_dev(cuq.d, cq.data(), cq.size() * 4);
  to_dev(cuk.d, ck.data(), ck.size() * 4);

  sftk::SwaParams p;
  p.dtype = c.dt;
  p.head_dim = D;
  p.q = q_.d;
  p.k = k_.d;
  p.v = v_.d;
  p.out = o_.d;
  p.o = o_.d;
  p.dout = do_.d;
  p.lse = static_cast<float*>(lse_.d);
  p.delta = static_cast<float*>(delta_.d);
  p.dq = dq_.d;
  p.dk = dk_.d;
  p.dv = dv_.d;
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
  p.batch = B;
  p.seqlen_q = max_q;
  p.seqlen_k = max_k;
  p.num_heads = HQ;
  p.num_kv_heads = HK;
  p.group = G;
  p.left = c.left;
  p.right = c.right;
  p.keys = c.keys;
  p.window_mode = c.mode;
  p.causal = c.causal;
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
  // Only the head_dim columns are outputs; padding between heads is never written.
  auto valid_only = [&](std::vector<float> got, const std::vector<double>& ref, std::vector<double>& r2) {
    std::vector<float> g2;
    r2.clear();
    for (size_t i = 0; i < ref.size(); ++i)
      if (static_cast<int>(i % hs) < D) {
        g2.push_back(got[i]);
        r2.push_back(ref[i]);
      }
    return g2;
  };
  std::vector<double> r;
  std::vector<float> g = valid_only(download(o_, c.dt), o_ref, r);
  rep.check("out", rel_err(g, r));
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
  rep.check("lse (and -inf rows)", rel_err(lse_got, lse_ref), inf_ok, 1e-4);
  g = valid_only(download(dq_, c.dt), dq_ref, r);
  rep.check("dq", rel_err(g, r));
  g = valid_only(download(dk_, c.dt), dk_ref, r);
  rep.check("dk", rel_err(g, r));
  g = valid_only(download(dv_, c.dt), dv_ref, r);
  rep.check("dv", rel_err(g, r));
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
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < G; ++i) {
      const int n = c.in_f[i], m = c.out_f[i];
      for (int r = 0; r < m; ++r) {
        double acc = c.bias ? bias[m_off[i] + r] : 0.0;
        for (int cc = 0; cc < n; ++cc) acc += static_cast<double>(x[t * ldx + n_off[i] + cc]) * w[w_off[i] + r * n + cc];
        y_ref[static_cast<size_t>(t) * ldy + m_off[i] + r] = acc;
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
  Buf x_(x.size()), w_(w.size()), b_(bias.size()), dy_(dy.size()), y_(y_ref.size()), dx_(dx_ref.size());
  Buf meta_f(mf.size(), 4), meta_x(mx.size(), 4), meta_w(mw.size(), 4);
  const int split = c.split;
  const int64_t t_chunk = ((T + split - 1) / split + kBdBlockK - 1) / kBdBlockK * kBdBlockK;
  const int eff_split = std::max<int>(1, static_cast<int>((T + t_chunk - 1) / t_chunk));
  Buf dw_(eff_split > 1 ? w.size() * eff_split : w.size(), eff_split > 1 ? 4 : 2);  // fp32 partials
  upload(x_, x, c.dt);
  upload(w_, w, c.dt);
  upload(b_, bias, c.dt);
  upload(dy_, dy, c.dt);
  to_dev(meta_f.d, mf.data(), mf.size() * 4);
  to_dev(meta_x.d, mx.data(), mx.size() * 4);
  to_dev(meta_w.d, mw.data(), mw.size() * 4);

  std::printf("%s [%s]\n", c.name.c_str(), c.dt == DType::kBFloat16 ? "bf16" : "fp16");
  BdGemmParams f;
  f.dtype = c.dt;
  f.a = x_.d;
  f.w = w_.d;
  f.bias = c.bias ? b_.d : nullptr;
  f.out = y_.d;
  f.meta = static_cast<const int*>(meta_f.d);
  f.num_groups = G;
  f.total_tiles_n = tf;
  f.tokens = T;
  f.lda = ldx;
  f.ldo = ldy;
  f.trans_w = false;
  cudaError_t err = bd_gemm(f, nullptr);
  BdGemmParams dxp = f;
  dxp.a = dy_.d;
  dxp.bias = nullptr;
  dxp.out = dx_.d;
  dxp.meta = static_cast<const int*>(meta_x.d);
  dxp.total_tiles_n = tx;
  dxp.lda = ldy;
  dxp.ldo = ldx;
  dxp.trans_w = true;
  if (err == cudaSuccess) err = bd_gemm(dxp, nullptr);
  BdDwParams wp;
  wp.dtype = c.dt;
  wp.dy = dy_.d;
  wp.x = x_.d;
  wp.dw = dw_.d;
  wp.dw_fp32 = eff_split > 1;
  wp.meta = static_cast<const int*>(meta_w.d);
  wp.num_groups = G;
  wp.total_tiles = tw;
  wp.tokens = T;
  wp.ld_dy = ldy;
  wp.ld_x = ldx;
  wp.t_chunk = t_chunk;
  wp.split = eff_split;
  wp.stride_split = w_off[G];
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
  std::vector<double> r;
  std::vector<float> g = strip(download(y_, c.dt), y_ref, r);
  rep.check("y", rel_err(g, r));
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

}  // namespace kt
