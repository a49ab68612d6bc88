// decode_attention.cpp: argument checks of the decode-step ops (see decode_attention.h) and their CPU registration.
#include "decode_attention.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace fusedrl {
namespace {

AttnDtype attn_dtype(const char* op, const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat: return AttnDtype::kFloat32;
    case at::kDouble: return AttnDtype::kFloat64;
    case at::kHalf: return AttnDtype::kFloat16;
    case at::kBFloat16: return AttnDtype::kBFloat16;
    default: TORCH_CHECK(false, op, ": q must be float32, float64, float16 or bfloat16, got ", q.scalar_type());
  }
}

void check_like(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref,
                const char* ref_name = "q") {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", arg, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", arg, " must have ", ref_name, "'s dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
}

// (B, heads, D) with contiguous heads and head dimension; any row stride.
void check_heads(const char* op, const char* arg, const at::Tensor& t, int64_t batch, int64_t head_dim) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == batch && t.size(2) == head_dim, op, ": ", arg,
              " must have shape (B, heads, D) = (", batch, ", heads, ", head_dim, "), got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == head_dim, op, ": ", arg,
              " must have contiguous heads (strides (*, D, 1)), got strides ", t.strides());
}

void check_cache(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& q, int64_t batch,
                 int64_t kv_heads, int64_t head_dim) {
  check_like(op, arg, t, q);
  TORCH_CHECK(t.dim() == 4 && t.size(0) >= batch && t.size(1) == kv_heads && t.size(3) == head_dim, op, ": ", arg,
              " must have shape (>= ", batch, ", ", kv_heads, ", L, ", head_dim, "), got ", t.sizes());
  TORCH_CHECK(t.stride(3) == 1, op, ": ", arg, " must be contiguous in its last dimension, got strides ",
              t.strides());
}

void check_slot(const char* op, const at::Tensor& slot, const at::Tensor& q, int64_t length) {
  TORCH_CHECK(slot.device() == q.device(), op, ": slot is on ", slot.device(), " but q is on ", q.device());
  TORCH_CHECK(slot.scalar_type() == at::kLong && slot.numel() == 1 && slot.is_contiguous(), op,
              ": slot must be one int64 value, got ", slot.scalar_type(), " of shape ", slot.sizes());
  if (slot.device().is_cpu()) {  // on a device the value is read by the kernel (no host sync); it clamps instead
    const int64_t value = slot.item<int64_t>();
    TORCH_CHECK(value >= 0 && value < length, op, ": slot must be in [0, ", length, "), got ", value);
  }
}

}  // namespace

at::Tensor rotary_cache_write_with(AttentionBackend& backend, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                                   const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                                   double eps, const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& slot) {
  const char* op = "rotary_cache_write";
  const AttnDtype dtype = attn_dtype(op, q);
  TORCH_CHECK(q.dim() == 3, op, ": q must have shape (B, H, D), got ", q.sizes());
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= 2048, op, ": the head dimension must be even and <= 2048, got ",
              head_dim);
  check_heads(op, "q", q, batch, head_dim);
  check_like(op, "k", k, q);
  check_like(op, "v", v, q);
  TORCH_CHECK(k.dim() == 3, op, ": k must have shape (B, Hkv, D), got ", k.sizes());
  const int64_t kv_heads = k.size(1);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, op, ": q's heads (", heads,
              ") must be a multiple of k's heads (", kv_heads, ")");
  check_heads(op, "k", k, batch, head_dim);
  check_heads(op, "v", v, batch, head_dim);
  TORCH_CHECK(v.size(1) == kv_heads && v.stride(0) == k.stride(0), op, ": v must have k's shape ", k.sizes(),
              " and row stride ", k.stride(0), ", got ", v.sizes(), " stride ", v.stride(0));
  for (const char* name : {"cos", "sin"}) {
    const at::Tensor& t = name[0] == 'c' ? cos : sin;
    check_like(op, name, t, q);
    TORCH_CHECK(t.dim() == 2 && t.size(0) == batch && t.size(1) == head_dim && t.is_contiguous(), op, ": ", name,
                " must be contiguous of shape (B, D) = (", batch, ", ", head_dim, "), got ", t.sizes());
  }
  for (const char* name : {"q_norm", "k_norm"}) {
    const std::optional<at::Tensor>& t = name[0] == 'q' ? q_norm : k_norm;
    if (!t.has_value()) continue;
    check_like(op, name, *t, q);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == head_dim && t->is_contiguous(), op, ": ", name,
                " must be a contiguous (D,) = (", head_dim, ",) weight, got ", t->sizes());
  }
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), op, ": give both q_norm and k_norm or neither");
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  check_cache(op, "cache_k", cache_k, q, batch, kv_heads, head_dim);
  check_cache(op, "cache_v", cache_v, q, batch, kv_heads, head_dim);
  TORCH_CHECK(cache_v.sizes() == cache_k.sizes() && cache_v.strides() == cache_k.strides(), op,
              ": cache_v must have cache_k's shape and strides");
  check_slot(op, slot, q, cache_k.size(2));

  at::Tensor q_out = at::empty_like(q, at::MemoryFormat::Contiguous);
  RotaryCacheWriteParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_row = q.stride(0);
  p.kv_row = k.stride(0);
  p.cos = cos.data_ptr();
  p.sin = sin.data_ptr();
  p.q_norm = q_norm.has_value() ? q_norm->data_ptr() : nullptr;
  p.k_norm = k_norm.has_value() ? k_norm->data_ptr() : nullptr;
  p.eps = eps;
  p.q_out = q_out.data_ptr();
  p.cache_k = cache_k.data_ptr();
  p.cache_v = cache_v.data_ptr();
  p.cache_row = cache_k.stride(0);
  p.cache_head = cache_k.stride(1);
  p.cache_pos = cache_k.stride(2);
  p.slot = slot.data_ptr<int64_t>();
  p.batch = batch;
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.head_dim = head_dim;
  p.length = cache_k.size(2);
  p.dtype = dtype;
  backend.rotary_cache_write(p);
  return q_out;
}

at::Tensor decode_attention_with(AttentionBackend& backend, const at::Tensor& q, const at::Tensor& cache_k,
                                 const at::Tensor& cache_v, const at::Tensor& start, const at::Tensor& slot,
                                 double scale, int64_t splits) {
  const char* op = "decode_attention";
  const AttnDtype dtype = attn_dtype(op, q);
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), op, ": q must be contiguous of shape (B, H, D), got ", q.sizes(),
              " strides ", q.strides());
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK(cache_k.dim() == 4, op, ": cache_k must have shape (>= B, Hkv, L, D), got ", cache_k.sizes());
  const int64_t kv_heads = cache_k.size(1);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, op, ": q's heads (", heads,
              ") must be a multiple of the cache's kv heads (", kv_heads, ")");
  check_cache(op, "cache_k", cache_k, q, batch, kv_heads, head_dim);
  check_cache(op, "cache_v", cache_v, q, batch, kv_heads, head_dim);
  TORCH_CHECK(cache_v.sizes() == cache_k.sizes() && cache_v.strides() == cache_k.strides(), op,
              ": cache_v must have cache_k's shape and strides");
  TORCH_CHECK(start.device() == q.device(), op, ": start is on ", start.device(), " but q is on ", q.device());
  TORCH_CHECK(start.scalar_type() == at::kInt && start.dim() == 1 && start.size(0) >= batch && start.is_contiguous(),
              op, ": start must be a contiguous int32 (>= B,) = (>= ", batch, ",) tensor, got ", start.scalar_type(),
              " of shape ", start.sizes());
  check_slot(op, slot, q, cache_k.size(2));
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op, ": scale must be finite and > 0, got ", scale);
  TORCH_CHECK(splits >= 0, op, ": splits must be >= 0 (0: chosen from the shapes), got ", splits);

  at::Tensor out = at::empty_like(q);
  DecodeAttentionParams p;
  p.q = q.data_ptr();
  p.cache_k = cache_k.data_ptr();
  p.cache_v = cache_v.data_ptr();
  p.cache_row = cache_k.stride(0);
  p.cache_head = cache_k.stride(1);
  p.cache_pos = cache_k.stride(2);
  p.start = start.data_ptr<int32_t>();
  p.slot = slot.data_ptr<int64_t>();
  p.out = out.data_ptr();
  p.batch = batch;
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.head_dim = head_dim;
  p.length = cache_k.size(2);
  p.scale = scale;
  p.dtype = dtype;
  p.splits = splits > 0 ? splits : backend.splits(p);
  at::Tensor workspace;
  if (p.splits > 1) {
    workspace = at::empty({decode_attention_workspace(batch, heads, head_dim, p.splits)}, q.options().dtype(at::kFloat));
    p.workspace = workspace.data_ptr<float>();
  }
  backend.decode_attention(p);
  return out;
}

at::Tensor rms_norm_with(AttentionBackend& backend, const at::Tensor& x, const at::Tensor& weight, double eps) {
  const char* op = "rms_norm";
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              op, ": x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  const AttnDtype dtype = attn_dtype(op, x);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, op, ": x must have shape (M, N) with contiguous rows, got shape ",
              x.sizes(), " strides ", x.strides());
  check_like(op, "weight", weight, x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(), op,
              ": weight must be a contiguous (N,) = (", x.size(1), ",) tensor, got ", weight.sizes());
  TORCH_CHECK(x.size(1) > 0, op, ": x must have at least one column");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  at::Tensor out = at::empty(x.sizes(), x.options());
  RmsNormParams p;
  p.x = x.data_ptr();
  p.x_row = x.stride(0);
  p.weight = weight.data_ptr();
  p.out = out.data_ptr();
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.eps = eps;
  p.dtype = dtype;
  backend.rms_norm(p);
  return out;
}

namespace {

class CpuAttentionBackend final : public AttentionBackend {
 public:
  explicit CpuAttentionBackend(const at::Device&) {}
  void rotary_cache_write(const RotaryCacheWriteParams& p) override { rotary_cache_write_cpu(p); }
  void rms_norm(const RmsNormParams& p) override {
    at::parallel_for(0, p.rows, 16, [&](int64_t r0, int64_t r1) { rms_norm_cpu(p, r0, r1); });
  }
  int64_t splits(const DecodeAttentionParams&) override { return 1; }
  // Rows in parallel: each writes only its own output rows.
  void decode_attention(const DecodeAttentionParams& p) override {
    at::parallel_for(0, p.batch, 1, [&](int64_t b0, int64_t b1) {
      DecodeAttentionParams rows = p;
      rows.batch = b1 - b0;
      rows.q = static_cast<const char*>(p.q) + b0 * p.heads * p.head_dim * element_size(p.dtype);
      rows.out = static_cast<char*>(p.out) + b0 * p.heads * p.head_dim * element_size(p.dtype);
      rows.cache_k = static_cast<const char*>(p.cache_k) + b0 * p.cache_row * element_size(p.dtype);
      rows.cache_v = static_cast<const char*>(p.cache_v) + b0 * p.cache_row * element_size(p.dtype);
      rows.start = p.start + b0;
      decode_attention_cpu(rows);
    });
  }

 private:
  static int64_t element_size(AttnDtype dtype) {
    return dtype == AttnDtype::kFloat64 ? 8 : dtype == AttnDtype::kFloat32 ? 4 : 2;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedrl, CPU, m) { register_decode_attention_ops<CpuAttentionBackend>(m); }

}  // namespace fusedrl
