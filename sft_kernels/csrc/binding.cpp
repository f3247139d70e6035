// Torch / pybind11 binding of the CUDA kernels: the module `sft_kernels._C` (ahead of
// time, setup.py) or `sft_kernels_C` (just in time, sft_kernels/_build.py); the same
// source, so the same API. The only file here that includes torch headers.
//
// Arguments mirror the Triton launchers (tensors, then element strides, then scalars,
// then the CUDA stream as an integer: torch.cuda.current_stream().cuda_stream). The
// Python launchers (sft_kernels/ops/*/cuda_backend.py) allocate outputs and compute
// strides; op.py validates shapes and windows. This file re-checks what the kernels
// rely on (device, dtype, head_dim, alignment, grid limits) and raises TypeError /
// ValueError (TORCH_CHECK_TYPE / TORCH_CHECK_VALUE) rather than crashing in a kernel.
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "sft_kernels.h"

namespace {

using at::Tensor;
using c10::optional;

sftk::DType dtype_of(const Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, "sft_kernels CUDA backend: ",
                   name, " must be float16 or bfloat16, got ", t.scalar_type(),
                   " (float32 runs on backend='triton' or 'torch')");
  return t.scalar_type() == at::kBFloat16 ? sftk::DType::kBFloat16 : sftk::DType::kFloat16;
}

void check_cuda(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK_VALUE(t.is_cuda(), "sft_kernels CUDA backend: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.device() == ref.device(), "sft_kernels CUDA backend: ", name, " is on ", t.device(),
                    " but q is on ", ref.device());
}

// The attention kernels read rows with 16-byte cp.async: pointer 16-byte aligned, unit
// last stride, other strides multiples of 8 elements.
void check_rows(const Tensor& t, const char* name, const Tensor& ref) {
  check_cuda(t, name, ref);
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "sft_kernels CUDA backend: ", name, " has dtype ",
                   t.scalar_type(), " but q has ", ref.scalar_type());
  TORCH_CHECK_VALUE(t.stride(-1) == 1, "sft_kernels CUDA backend: ", name, " needs a contiguous last dimension");
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "sft_kernels CUDA backend: ", name,
                    " must be 16-byte aligned (call .contiguous())");
  for (int64_t i = 0; i + 1 < t.dim(); ++i)
    TORCH_CHECK_VALUE(t.stride(i) % 8 == 0, "sft_kernels CUDA backend: ", name, ".stride(", i, ") = ", t.stride(i),
                      " must be a multiple of 8 elements (call .contiguous())");
}

void* rows_ptr(const Tensor& t, const char* name, const Tensor& ref) {  // check_rows, then the pointer
  check_rows(t, name, ref);
  return t.data_ptr();
}

float* f32_ptr(const Tensor& t, const char* name, const Tensor& ref) {
  check_cuda(t, name, ref);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "sft_kernels CUDA backend: ", name, " must be float32, got ",
                   t.scalar_type());
  return t.data_ptr<float>();
}

const int* cu_ptr(const optional<Tensor>& t, const char* name, const Tensor& ref) {
  if (!t.has_value() || !t->defined() || t->numel() == 0) return nullptr;
  check_cuda(*t, name, ref);
  TORCH_CHECK_TYPE(t->scalar_type() == at::kInt, "sft_kernels CUDA backend: ", name, " must be int32, got ",
                   t->scalar_type());
  TORCH_CHECK_VALUE(t->is_contiguous(), "sft_kernels CUDA backend: ", name, " must be contiguous");
  return t->data_ptr<int>();
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "sft_kernels CUDA backend: ", what, " failed: ", cudaGetErrorString(err));
}

// What both passes take: q, k, v, the sequences, heads and window (checked, q first).
sftk::SwaParams attention_params(const Tensor& q, const Tensor& k, const Tensor& v, const optional<Tensor>& cu_q,
                                 const optional<Tensor>& cu_k, int64_t seqlen_q, int64_t seqlen_k, int64_t num_heads,
                                 int64_t group, int64_t left, int64_t right, int64_t keys, double sm_scale,
                                 int64_t batch, int64_t window_mode, bool causal) {
  check_rows(q, "q", q);
  sftk::SwaParams p;
  p.dtype = dtype_of(q, "q");
  p.head_dim = static_cast<int>(q.size(-1));
  TORCH_CHECK_VALUE(sftk::swa_supports_head_dim(p.head_dim), "sft_kernels CUDA backend: head_dim ", p.head_dim,
                    " has no compiled kernel (supported: 64, 128); use backend='triton'");
  check_rows(k, "k", q);
  check_rows(v, "v", q);
  TORCH_CHECK_VALUE(k.size(-1) == q.size(-1) && v.size(-1) == q.size(-1), "sft_kernels CUDA backend: q, k, v must "
                    "share head_dim");
  TORCH_CHECK_VALUE(group >= 1 && num_heads % group == 0, "sft_kernels CUDA backend: group ", group,
                    " must divide num_heads ", num_heads);
  TORCH_CHECK_VALUE(window_mode == sftk::kModeExplicit || window_mode == sftk::kModeKeys ||
                        window_mode == sftk::kModeSqrt,
                    "sft_kernels CUDA backend: window_mode must be ", sftk::kModeExplicit, " (explicit), ",
                    sftk::kModeKeys, " (keys) or ", sftk::kModeSqrt, " (sqrt), got ", window_mode);
  const int64_t big = int64_t(1) << 30;
  TORCH_CHECK_VALUE(left >= -1 && left < big && right >= -1 && right < big && keys >= 0 && keys < big,
                    "sft_kernels CUDA backend: window bounds must be in [-1, 2^30), got left=", left,
                    " right=", right, " keys=", keys);
  TORCH_CHECK_VALUE(seqlen_q < big && seqlen_k < big, "sft_kernels CUDA backend: sequences longer than 2^30");
  // heads are grid.y; sequences go on grid.z, 65,535 per launch (any batch size)
  TORCH_CHECK_VALUE(num_heads <= sftk::kMaxGridYZ, "sft_kernels CUDA backend: ", num_heads,
                    " query heads exceed the grid limit ", sftk::kMaxGridYZ);
  TORCH_CHECK_VALUE(batch <= (int64_t(1) << 30), "sft_kernels CUDA backend: batch ", batch, " too large");
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.cu_seqlens_q = cu_ptr(cu_q, "cu_seqlens_q", q);
  p.cu_seqlens_k = cu_ptr(cu_k, "cu_seqlens_k", q);
  TORCH_CHECK_VALUE((p.cu_seqlens_q == nullptr) == (p.cu_seqlens_k == nullptr),
                    "sft_kernels CUDA backend: give both cu_seqlens_q and cu_seqlens_k or neither");
  p.batch = static_cast<int>(batch);
  p.seqlen_q = static_cast<int>(seqlen_q);
  p.seqlen_k = static_cast<int>(seqlen_k);
  p.num_heads = static_cast<int>(num_heads);
  p.group = static_cast<int>(group);
  p.num_kv_heads = static_cast<int>(num_heads / group);
  p.left = static_cast<int>(left);
  p.right = static_cast<int>(right);
  p.keys = static_cast<int>(keys);
  p.window_mode = static_cast<int>(window_mode);
  p.causal = causal;
  p.sm_scale = static_cast<float>(sm_scale);
  return p;
}

// The strides both passes take: q, k, v, O (batch, row, head) and LSE / delta (batch, head).
void set_strides(sftk::SwaParams& p, int64_t qb, int64_t qm, int64_t qh, int64_t kb, int64_t kn, int64_t kh, int64_t vb,
                 int64_t vn, int64_t vh, int64_t ob, int64_t om, int64_t oh, int64_t lb, int64_t lh) {
  p.stride_qb = qb, p.stride_qm = qm, p.stride_qh = qh;
  p.stride_kb = kb, p.stride_kn = kn, p.stride_kh = kh;
  p.stride_vb = vb, p.stride_vn = vn, p.stride_vh = vh;
  p.stride_ob = ob, p.stride_om = om, p.stride_oh = oh;
  p.stride_lb = lb, p.stride_lh = lh;
}

// out, lse <- sliding-window attention (arguments of _swa_fwd_kernel).
void swa_fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Tensor& lse,
             const optional<Tensor>& cu_seqlens_q, const optional<Tensor>& cu_seqlens_k, int64_t stride_qb,
             int64_t stride_qm, int64_t stride_qh, int64_t stride_kb, int64_t stride_kn, int64_t stride_kh,
             int64_t stride_vb, int64_t stride_vn, int64_t stride_vh, int64_t stride_ob, int64_t stride_om,
             int64_t stride_oh, int64_t stride_lb, int64_t stride_lh, int64_t seqlen_q, int64_t seqlen_k,
             int64_t num_heads, int64_t group, int64_t left, int64_t right, int64_t keys, double sm_scale,
             int64_t batch, int64_t window_mode, bool causal, int64_t stream) {
  sftk::SwaParams p = attention_params(q, k, v, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, num_heads, group,
                                       left, right, keys, sm_scale, batch, window_mode, causal);
  p.out = rows_ptr(out, "out", q);
  p.lse = f32_ptr(lse, "lse", q);
  const c10::cuda::CUDAGuard guard(q.device());
  set_strides(p, stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
              stride_ob, stride_om, stride_oh, stride_lb, stride_lh);
  check_launch(sftk::swa_forward(p, reinterpret_cast<cudaStream_t>(stream)), "swa_forward");
}

// dq, dk, dv <- backward; delta is a float32 workspace shaped like lse.
void swa_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
             const Tensor& lse, Tensor& delta, Tensor& dq, Tensor& dk, Tensor& dv,
             const optional<Tensor>& cu_seqlens_q, const optional<Tensor>& cu_seqlens_k, int64_t stride_qb,
             int64_t stride_qm, int64_t stride_qh, int64_t stride_kb, int64_t stride_kn, int64_t stride_kh,
             int64_t stride_vb, int64_t stride_vn, int64_t stride_vh, int64_t stride_ob, int64_t stride_om,
             int64_t stride_oh, int64_t stride_dob, int64_t stride_dom, int64_t stride_doh, int64_t stride_dqb,
             int64_t stride_dqm, int64_t stride_dqh, int64_t stride_dkb, int64_t stride_dkn, int64_t stride_dkh,
             int64_t stride_dvb, int64_t stride_dvn, int64_t stride_dvh, int64_t stride_lb, int64_t stride_lh,
             int64_t seqlen_q, int64_t seqlen_k, int64_t num_heads, int64_t group, int64_t left, int64_t right,
             int64_t keys, double sm_scale, int64_t batch, int64_t window_mode, bool causal, int64_t stream) {
  sftk::SwaParams p = attention_params(q, k, v, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, num_heads, group,
                                       left, right, keys, sm_scale, batch, window_mode, causal);
  p.dout = rows_ptr(dout, "dout", q);
  p.o = rows_ptr(out, "out", q);
  p.dq = rows_ptr(dq, "dq", q);
  p.dk = rows_ptr(dk, "dk", q);
  p.dv = rows_ptr(dv, "dv", q);
  p.lse = f32_ptr(lse, "lse", q);
  p.delta = f32_ptr(delta, "delta", q);
  TORCH_CHECK_VALUE(delta.sizes() == lse.sizes() && delta.strides() == lse.strides(),
                    "sft_kernels CUDA backend: delta must have lse's shape and strides");
  const c10::cuda::CUDAGuard guard(q.device());
  set_strides(p, stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
              stride_ob, stride_om, stride_oh, stride_lb, stride_lh);
  p.stride_dob = stride_dob, p.stride_dom = stride_dom, p.stride_doh = stride_doh;
  p.stride_dqb = stride_dqb, p.stride_dqm = stride_dqm, p.stride_dqh = stride_dqh;
  p.stride_dkb = stride_dkb, p.stride_dkn = stride_dkn, p.stride_dkh = stride_dkh;
  p.stride_dvb = stride_dvb, p.stride_dvn = stride_dvn, p.stride_dvh = stride_dvh;
  check_launch(sftk::swa_backward(p, reinterpret_cast<cudaStream_t>(stream)), "swa_backward");
}

void check_meta(const Tensor& meta, const Tensor& ref) {
  check_cuda(meta, "meta", ref);
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kInt, "sft_kernels CUDA backend: meta must be int32");
  TORCH_CHECK_VALUE(meta.dim() == 2 && meta.size(1) == sftk::kBdMetaCols && meta.is_contiguous(),
                    "sft_kernels CUDA backend: meta must be a contiguous (groups, ", sftk::kBdMetaCols, ") table");
}

void check_2d(const Tensor& t, const char* name, const Tensor& ref) {
  check_cuda(t, name, ref);
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "sft_kernels CUDA backend: ", name, " has dtype ",
                   t.scalar_type(), ", expected ", ref.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.stride(1) == 1, "sft_kernels CUDA backend: ", name,
                    " must be 2-D with a unit column stride");
}

// Forward (trans_w = false): out[:, col_i] = a[:, k_i] @ W_i^T (+ bias); dX (trans_w): out = a @ W_i.
void bd_gemm(const Tensor& a, const Tensor& w, const optional<Tensor>& bias, Tensor& out, const Tensor& meta,
             int64_t total_tiles_n, bool trans_w, int64_t stream) {
  sftk::BdGemmParams p;
  p.dtype = dtype_of(a, "x");
  check_2d(a, "x", a);
  check_2d(out, "out", a);
  check_cuda(w, "weight", a);
  TORCH_CHECK_TYPE(w.scalar_type() == a.scalar_type(), "sft_kernels CUDA backend: weight dtype must match x");
  TORCH_CHECK_VALUE(w.is_contiguous(), "sft_kernels CUDA backend: weight must be contiguous");
  check_meta(meta, a);
  TORCH_CHECK_VALUE(out.size(0) == a.size(0), "sft_kernels CUDA backend: out and x must have the same rows");
  const c10::cuda::CUDAGuard guard(a.device());
  if (bias.has_value() && bias->defined()) {
    check_cuda(*bias, "bias", a);
    TORCH_CHECK_TYPE(bias->scalar_type() == a.scalar_type(), "sft_kernels CUDA backend: bias dtype must match x");
    TORCH_CHECK_VALUE(bias->is_contiguous(), "sft_kernels CUDA backend: bias must be contiguous");
    p.bias = bias->data_ptr();
  }
  p.a = a.data_ptr(), p.lda = a.stride(0), p.tokens = a.size(0);
  p.w = w.data_ptr();
  p.out = out.data_ptr(), p.ldo = out.stride(0);
  p.meta = meta.data_ptr<int>(), p.num_groups = static_cast<int>(meta.size(0));
  p.total_tiles_n = static_cast<int>(total_tiles_n), p.trans_w = trans_w;
  // token tiles are grid.x (up to 2^31 - 1), column tiles grid.y
  TORCH_CHECK_VALUE(total_tiles_n <= sftk::kMaxGridYZ, "sft_kernels CUDA backend: ", total_tiles_n,
                    " column tiles exceed the grid limit ", sftk::kMaxGridYZ);
  check_launch(sftk::bd_gemm(p, reinterpret_cast<cudaStream_t>(stream)), "block_diag gemm");
}

// dW (split == 1: flat, x's dtype) or fp32 partials (split, numel) for split > 1.
void bd_dw(const Tensor& dy, const Tensor& x, Tensor& dw, const Tensor& meta, int64_t total_tiles, int64_t t_chunk,
           int64_t split, int64_t stream) {
  sftk::BdDwParams p;
  p.dtype = dtype_of(x, "x");
  check_2d(x, "x", x);
  check_2d(dy, "grad", x);
  check_cuda(dw, "dw", x);
  check_meta(meta, x);
  TORCH_CHECK_VALUE(dy.size(0) == x.size(0), "sft_kernels CUDA backend: grad and x must have the same rows");
  TORCH_CHECK_VALUE(split >= 1 && split <= 65535 && t_chunk % sftk::kBdBlockK == 0,
                    "sft_kernels CUDA backend: bad split / t_chunk");
  p.dw_fp32 = split > 1;
  if (p.dw_fp32) {
    TORCH_CHECK_TYPE(dw.scalar_type() == at::kFloat, "sft_kernels CUDA backend: split dW partials must be float32");
    TORCH_CHECK_VALUE(dw.dim() == 2 && dw.size(0) == split && dw.stride(1) == 1,
                      "sft_kernels CUDA backend: dW partials must be (split, numel)");
    p.stride_split = dw.stride(0);
  } else {
    TORCH_CHECK_TYPE(dw.scalar_type() == x.scalar_type(), "sft_kernels CUDA backend: dW must have x's dtype");
    TORCH_CHECK_VALUE(dw.is_contiguous(), "sft_kernels CUDA backend: dW must be contiguous");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  p.dy = dy.data_ptr(), p.ld_dy = dy.stride(0);
  p.x = x.data_ptr(), p.ld_x = x.stride(0), p.tokens = x.size(0);
  p.dw = dw.data_ptr();
  p.meta = meta.data_ptr<int>(), p.num_groups = static_cast<int>(meta.size(0));
  p.total_tiles = static_cast<int>(total_tiles), p.t_chunk = t_chunk, p.split = static_cast<int>(split);
  check_launch(sftk::bd_dw(p, reinterpret_cast<cudaStream_t>(stream)), "block_diag dW");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sft_kernels CUDA C++ kernels (sliding-window attention, block-diagonal matmul)";
  m.def("swa_fwd", &swa_fwd, "sliding-window attention forward");
  m.def("swa_bwd", &swa_bwd, "sliding-window attention backward");
  m.def("bd_gemm", &bd_gemm, "block-diagonal grouped GEMM: forward (+bias) / dX");
  m.def("bd_dw", &bd_dw, "block-diagonal grouped GEMM: dW");
  m.attr("SWA_HEAD_DIMS") = pybind11::make_tuple(64, 128);
  m.attr("BD_BLOCK_M") = sftk::kBdBlockM;
  m.attr("BD_BLOCK_N") = sftk::kBdBlockN;
  m.attr("BD_BLOCK_K") = sftk::kBdBlockK;
  m.attr("BD_META_COLS") = sftk::kBdMetaCols;
  m.attr("WINDOW_MODE_EXPLICIT") = sftk::kModeExplicit;
  m.attr("WINDOW_MODE_KEYS") = sftk::kModeKeys;
  m.attr("WINDOW_MODE_SQRT") = sftk::kModeSqrt;
}
