// nf4.cpp: argument checks and the composition of the NF4 ops (see nf4.h), plus their CPU registration.
#include "nf4.h"

#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <string>

namespace fusedrl {
namespace {

bool valid_blocksize(int64_t b) { return b >= 32 && b <= 4096 && (b & (b - 1)) == 0; }

Nf4Dtype nf4_dtype(const char* op, const char* arg, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Nf4Dtype::kFloat32;
    case at::kHalf: return Nf4Dtype::kFloat16;
    case at::kBFloat16: return Nf4Dtype::kBFloat16;
    default: TORCH_CHECK(false, op, ": ", arg, " must be float32, float16 or bfloat16, got ", t);
  }
}

void check_device(const char* op, const char* arg, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.device() == device, op, ": ", arg, " is on ", t.device(), " but the op runs on ", device);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Writes all shards of w, stacked along rows, into out (N, ld) of a float32/16-bit dtype.
void dequantize_into(Nf4Backend& backend, const Nf4Shards& w, void* out, int64_t ld, at::ScalarType dtype) {
  const int64_t element = at::elementSize(dtype);
  int64_t row0 = 0;
  for (const Nf4Weight& shard : w.weights) {
    Nf4DequantParams p;
    p.w = shard;
    p.out = static_cast<char*>(out) + row0 * ld * element;
    p.ld = ld;
    p.dtype = nf4_dtype("nf4_dequantize", "dtype", dtype);
    backend.dequantize(p);
    row0 += shard.rows;
  }
}

// Dequantized W in the compute dtype, with `extra_cols` more columns (row stride cols + extra_cols) or
// `extra_rows` more rows left for the caller to fill. float64 goes through float32 (exact).
at::Tensor dequantize_scratch(Nf4Backend& backend, const Nf4Shards& w, at::ScalarType dtype,
                              const at::TensorOptions& options, int64_t extra_rows, int64_t extra_cols) {
  const at::ScalarType kernel_dtype = dtype == at::kDouble ? at::kFloat : dtype;
  at::Tensor scratch = at::empty({w.rows + extra_rows, w.cols + extra_cols}, options.dtype(kernel_dtype));
  dequantize_into(backend, w, scratch.data_ptr(), w.cols + extra_cols, kernel_dtype);
  return kernel_dtype == dtype ? scratch : scratch.to(dtype);
}

void check_lora(const char* op, const at::Tensor& x, const Nf4Shards& w, const at::Tensor& lora_A,
                const at::Tensor& lora_B) {
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == w.cols, op, ": lora_A must have shape (r, K) with K = ",
              w.cols, ", got ", lora_A.sizes());
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == w.rows && lora_B.size(1) == lora_A.size(0), op,
              ": lora_B must have shape (N, r) = (", w.rows, ", ", lora_A.size(0), "), got ", lora_B.sizes());
  TORCH_CHECK(lora_A.scalar_type() == lora_B.scalar_type(), op, ": lora_A (", lora_A.scalar_type(),
              ") and lora_B (", lora_B.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(at::isFloatingType(lora_A.scalar_type()), op, ": lora_A must be floating point, got ",
              lora_A.scalar_type());
  check_device(op, "lora_A", lora_A, x.device());
  check_device(op, "lora_B", lora_B, x.device());
}

void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension (..., K)");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble, op,
              ": x must be float32, float16, bfloat16 or float64, got ", t);
}

// Host-side economy: every dispatched op costs microseconds of CPU, which at projection sizes is the step's time.
// t in `dtype`, without a dispatch when it already is.
at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// t (..., cols) as a contiguous (rows, cols) matrix, without a dispatch when it already is one.
at::Tensor as_matrix(const at::Tensor& t, int64_t cols) {
  if (t.dim() == 2 && t.is_contiguous()) return t;
  return t.reshape({-1, cols}).contiguous();
}

// (M, N) output shape of a (..., K) input
std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

}  // namespace

Nf4Shards nf4_shards(const char* op, const at::Device& device, at::TensorList packed, at::TensorList absmax,
                     at::TensorList nested_absmax, at::TensorList nested_code, at::ArrayRef<double> offset,
                     at::IntArrayRef rows, int64_t cols, int64_t blocksize) {
  const size_t count = packed.size();
  TORCH_CHECK(count >= 1, op, ": packed must hold at least one shard");
  TORCH_CHECK(absmax.size() == count && rows.size() == count, op, ": packed, absmax and rows must have one entry ",
              "per shard, got ", count, ", ", absmax.size(), " and ", rows.size());
  const bool nested = !nested_absmax.empty();
  TORCH_CHECK(!nested || (nested_absmax.size() == count && nested_code.size() == count && offset.size() == count),
              op, ": nested_absmax, nested_code and offset must have one entry per shard (", count, ") or be empty, ",
              "got ", nested_absmax.size(), ", ", nested_code.size(), " and ", offset.size());
  TORCH_CHECK(nested || nested_code.empty(), op, ": nested_code given without nested_absmax");
  TORCH_CHECK(valid_blocksize(blocksize), op, ": blocksize must be a power of two in [32, 4096] (64, 128 or 256 ",
              "as bitsandbytes writes), got ", blocksize);
  TORCH_CHECK(cols >= 1, op, ": the weight must have at least one column (K >= 1), got K = ", cols);
  Nf4Shards w;
  w.cols = cols;
  w.device = device;
  for (size_t i = 0; i < count; ++i) {
    const std::string at_shard = count > 1 ? " (shard " + std::to_string(i) + ")" : std::string();
    TORCH_CHECK(rows[i] >= 1, op, ": rows", at_shard, " must be >= 1, got ", rows[i]);
    const int64_t n = rows[i] * cols, nblocks = ceil_div(n, blocksize);
    const at::Tensor& p = packed[i];
    TORCH_CHECK(p.scalar_type() == at::kByte, op, ": packed", at_shard, " must be uint8, got ", p.scalar_type());
    check_device(op, "packed", p, device);
    TORCH_CHECK(p.is_contiguous(), op, ": packed", at_shard, " must be contiguous");
    TORCH_CHECK(p.numel() == ceil_div(n, 2), op, ": packed", at_shard, " holds ", p.numel(), " bytes but a (",
                rows[i], ", ", cols, ") weight needs ", ceil_div(n, 2));
    const at::Tensor& a = absmax[i];
    check_device(op, "absmax", a, device);
    TORCH_CHECK(a.is_contiguous(), op, ": absmax", at_shard, " must be contiguous");
    TORCH_CHECK(a.numel() == nblocks, op, ": absmax", at_shard, " must hold ", nblocks, " values (one per block of ",
                blocksize, "), got ", a.numel());
    Nf4Weight s;
    s.packed = p.data_ptr<uint8_t>();
    s.rows = rows[i];
    s.cols = cols;
    s.blocksize = blocksize;
    if (!nested) {
      TORCH_CHECK(a.scalar_type() == at::kFloat, op, ": absmax", at_shard, " must be float32, got ", a.scalar_type());
      s.absmax = a.data_ptr<float>();
    } else {
      TORCH_CHECK(a.scalar_type() == at::kByte, op, ": absmax", at_shard, " of a nested state must be uint8 codes, got ",
                  a.scalar_type());
      const at::Tensor& na = nested_absmax[i];
      const at::Tensor& nc = nested_code[i];
      TORCH_CHECK(na.scalar_type() == at::kFloat && na.is_contiguous() &&
                      na.numel() == ceil_div(nblocks, kNf4NestedBlocksize),
                  op, ": nested_absmax", at_shard, " must be a contiguous float32 tensor of ",
                  ceil_div(nblocks, kNf4NestedBlocksize), " values, got ", na.scalar_type(), " ", na.sizes());
      TORCH_CHECK(nc.scalar_type() == at::kFloat && nc.is_contiguous() && nc.numel() == 256, op, ": nested_code",
                  at_shard, " must be a contiguous float32 tensor of 256 values, got ", nc.scalar_type(), " ",
                  nc.sizes());
      check_device(op, "nested_absmax", na, device);
      check_device(op, "nested_code", nc, device);
      s.absmax_q = a.data_ptr<uint8_t>();
      s.nested_absmax = na.data_ptr<float>();
      s.nested_code = nc.data_ptr<float>();
      s.offset = static_cast<float>(offset[i]);
    }
    w.weights.push_back(s);
    w.rows += rows[i];
  }
  return w;
}

at::Tensor nf4_quantize_impl(Nf4Backend& backend, const at::Tensor& weight, int64_t blocksize, at::Tensor& absmax) {
  const Nf4Dtype dtype = nf4_dtype("nf4_quantize", "weight", weight.scalar_type());
  TORCH_CHECK(valid_blocksize(blocksize), "nf4_quantize: blocksize must be a power of two in [32, 4096] (64, 128 ",
              "or 256 as bitsandbytes writes), got ", blocksize);
  const at::Tensor x = weight.contiguous();
  const int64_t n = x.numel();
  at::Tensor packed = at::empty({ceil_div(n, 2), 1}, x.options().dtype(at::kByte));
  absmax = at::empty({ceil_div(n, blocksize)}, x.options().dtype(at::kFloat));
  backend.quantize(x.data_ptr(), dtype, n, blocksize, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>());
  return packed;
}

std::tuple<at::Tensor, at::Tensor> blockwise8_quantize_impl(Nf4Backend& backend, const at::Tensor& values,
                                                            const at::Tensor& code, int64_t blocksize) {
  const char* op = "blockwise8_quantize";
  TORCH_CHECK(values.scalar_type() == at::kFloat, op, ": values must be float32, got ", values.scalar_type());
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 256, op,
              ": code must be a float32 tensor of 256 sorted values, got ", code.scalar_type(), " ", code.sizes());
  check_device(op, "code", code, values.device());
  TORCH_CHECK(valid_blocksize(blocksize), op, ": blocksize must be a power of two in [32, 4096], got ", blocksize);
  const at::Tensor x = values.contiguous(), c = code.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({ceil_div(x.numel(), blocksize)}, x.options());
  backend.blockwise8(x.data_ptr<float>(), x.numel(), blocksize, c.data_ptr<float>(), out.data_ptr<uint8_t>(),
                     absmax.data_ptr<float>());
  return {out, absmax};
}

at::Tensor nf4_dequantize_impl(Nf4Backend& backend, const Nf4Shards& w, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "nf4_dequantize: dtype must be float32, float16, bfloat16 or float64, got ", dtype);
  return dequantize_scratch(backend, w, dtype, at::TensorOptions().device(w.device), 0, 0);
}

namespace {

// The fused small-M forward (M <= 16, 16-bit x): the LoRA down-projection and one kernel per shard reading the 4-bit
// weight once; an undefined tensor when this device has no such kernel for these operands.
at::Tensor small_m_forward(Nf4Backend& backend, const at::Tensor& x2, const Nf4Shards& w, const at::Tensor& lora_A,
                           const at::Tensor& lora_B, double scaling, const at::Tensor& bias_c) {
  const at::ScalarType dtype = x2.scalar_type();
  const int64_t m = x2.size(0), n = w.rows, k = w.cols, r = lora_A.size(0);
  if (!backend.fuses_small_m()) return at::Tensor();
  for (const Nf4Weight& shard : w.weights) {
    Nf4MatmulParams probe;
    probe.w = shard;
    probe.x = x2.data_ptr();
    probe.m = m;
    probe.dtype = nf4_dtype("nf4_lora_linear", "x", dtype);
    if (!nf4_matmul_cuda_supported(probe)) return at::Tensor();
  }
  at::Tensor lora = at::empty({m, r}, x2.options().dtype(at::kFloat));
  const at::Tensor a_c = lora_A.scalar_type() == dtype ? lora_A.contiguous() : at::Tensor();
  Nf4LoraDownParams down;
  down.x = x2.data_ptr();
  down.a = a_c.defined() ? a_c.data_ptr() : nullptr;
  down.lora = lora.data_ptr<float>();
  down.m = m;
  down.rank = r;
  down.k = k;
  down.scaling = static_cast<float>(scaling);
  down.dtype = nf4_dtype("nf4_lora_linear", "x", dtype);
  if (!a_c.defined() || !backend.lora_down(down)) {
    // s * x A^T in the adapters' dtype, as the large-M path computes it
    lora.copy_(at::mm(as_dtype(x2, lora_A.scalar_type()), lora_A.t()).mul_(scaling));
  }
  const at::Tensor b_c = as_dtype(lora_B, dtype).contiguous();
  at::Tensor y = at::empty({m, n}, x2.options());
  int64_t row0 = 0;
  for (const Nf4Weight& shard : w.weights) {
    Nf4MatmulParams p;
    p.w = shard;
    p.x = x2.data_ptr();
    p.m = m;
    p.y = static_cast<char*>(y.data_ptr()) + row0 * y.element_size();
    p.ld_y = n;
    p.dtype = down.dtype;
    p.lora = lora.data_ptr<float>();
    p.lora_B = static_cast<const char*>(b_c.data_ptr()) + row0 * r * b_c.element_size();
    p.rank = r;
    p.bias = bias_c.defined() ? static_cast<const char*>(bias_c.data_ptr()) + row0 * bias_c.element_size() : nullptr;
    if (!backend.matmul(p)) return at::Tensor();
    row0 += shard.rows;
  }
  return y;
}

}  // namespace

at::Tensor nf4_lora_linear_impl(Nf4Backend& backend, const at::Tensor& x, const Nf4Shards& w, const at::Tensor& lora_A,
                                const at::Tensor& lora_B, double scaling, const std::optional<at::Tensor>& bias) {
  const char* op = "nf4_lora_linear";
  // The GEMMs below run in the dtypes chosen here, not re-cast by an enclosing autocast region.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_x(op, x);
  check_lora(op, x, w, lora_A, lora_B);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.rows, op, ": bias must have shape (N,) = (", w.rows,
                ",), got ", bias->sizes());
    check_device(op, "bias", *bias, x.device());
  }
  const at::ScalarType dtype = x.scalar_type(), adapter = lora_A.scalar_type();
  const int64_t k = w.cols, n = w.rows, r = lora_A.size(0);
  const at::Tensor x2 = as_matrix(x, k);
  const int64_t m = x2.size(0);
  const at::Tensor bias_c = has_bias ? as_dtype(*bias, dtype).contiguous() : at::Tensor();

  if (m <= kNf4MatmulMaxM && m >= 1 && (dtype == at::kHalf || dtype == at::kBFloat16)) {
    at::Tensor y = small_m_forward(backend, x2, w, lora_A, lora_B, scaling, bias_c);
    if (y.defined()) return x.dim() == 2 ? y : y.reshape(out_shape(x, n));
  }

  // x A^T in the adapters' dtype (M, r), unscaled: the scale goes into the GEMMs below.
  const at::Tensor xa = at::mm(as_dtype(x2, adapter), lora_A.t());
  at::Tensor y;
  if (k < n) {
    // y = [x | s x A^T] @ [W | B]^T: one GEMM, K + r columns.
    at::Tensor w_aug = dequantize_scratch(backend, w, dtype, x2.options(), 0, r);
    w_aug.narrow(1, k, r).copy_(lora_B);
    at::Tensor x_aug = at::empty({m, k + r}, x2.options());
    x_aug.narrow(1, 0, k).copy_(x2);
    at::Tensor x_lora = x_aug.narrow(1, k, r);
    if (xa.scalar_type() == dtype)
      at::mul_out(x_lora, xa, scaling);
    else
      x_lora.copy_(xa.mul(scaling));  // scaled in the adapters' dtype, then cast
    y = has_bias ? at::addmm(bias_c, x_aug, w_aug.t()) : at::mm(x_aug, w_aug.t());
  } else {
    // y = s (x A^T) B^T (+ bias), then y += x W^T in the main GEMM's epilogue (beta = 1); the scale s rides on the
    // small GEMM's alpha (with a bias) or on the main GEMM's beta (without one).
    const at::Tensor w_full = dequantize_scratch(backend, w, dtype, x2.options(), 0, 0);
    const at::Tensor xa_d = as_dtype(xa, dtype), b_d = as_dtype(lora_B, dtype);
    if (has_bias) {
      y = at::addmm(bias_c, xa_d, b_d.t(), 1.0, scaling);
      y.addmm_(x2, w_full.t());
    } else {
      y = at::mm(xa_d, b_d.t());
      y.addmm_(x2, w_full.t(), scaling, 1.0);
    }
  }
  return x.dim() == 2 ? y : y.reshape(out_shape(x, n));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nf4_lora_linear_backward_impl(
    Nf4Backend& backend, const at::Tensor& grad_y, const at::Tensor& x, const Nf4Shards& w, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, std::array<bool, 3> output_mask) {
  const char* op = "nf4_lora_linear_backward";
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_x(op, x);
  check_lora(op, x, w, lora_A, lora_B);
  const int64_t k = w.cols, n = w.rows, r = lora_A.size(0);
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef(out_shape(x, n)), op, ": grad_y must have shape ",
              at::IntArrayRef(out_shape(x, n)), ", got ", grad_y.sizes());
  check_device(op, "grad_y", grad_y, x.device());
  const at::ScalarType dtype = x.scalar_type(), adapter = lora_A.scalar_type();
  const at::Tensor x2 = as_matrix(x, k);
  const at::Tensor g = as_matrix(as_dtype(grad_y, dtype), n);
  const int64_t m = x2.size(0);
  const at::Tensor g_adapter = as_dtype(g, adapter);
  const at::Tensor u = at::mm(g_adapter, lora_B).mul_(scaling);  // s g B (M, r)
  at::Tensor grad_x, grad_a, grad_b;
  if (output_mask[1] || output_mask[2]) {
    const at::Tensor x_adapter = as_dtype(x2, adapter);
    if (output_mask[1]) grad_a = at::mm(u.t(), x_adapter);
    if (output_mask[2]) {
      // dB = s g^T (x A^T): the scale on the GEMM's alpha
      const at::Tensor xa = at::mm(x_adapter, lora_A.t());
      grad_b = at::empty({n, r}, xa.options());
      at::addmm_out(grad_b, grad_b, g_adapter.t(), xa, 0.0, scaling);
    }
  }
  if (output_mask[0]) {
    if (n < k) {
      // dX = [g | u] @ [W ; A]: one GEMM, N + r rows.
      at::Tensor w_aug = dequantize_scratch(backend, w, dtype, x2.options(), r, 0);
      w_aug.narrow(0, n, r).copy_(lora_A);
      at::Tensor g_aug = at::empty({m, n + r}, x2.options());
      g_aug.narrow(1, 0, n).copy_(g);
      g_aug.narrow(1, n, r).copy_(u);
      grad_x = at::mm(g_aug, w_aug);
    } else {
      const at::Tensor w_full = dequantize_scratch(backend, w, dtype, x2.options(), 0, 0);
      grad_x = at::mm(as_dtype(u, dtype), as_dtype(lora_A, dtype));
      grad_x.addmm_(g, w_full);
    }
    if (x.dim() != 2) grad_x = grad_x.reshape(x.sizes());
  }
  return {output_mask[0] ? grad_x : x.new_empty({0}), output_mask[1] ? grad_a : lora_A.new_empty({0}),
          output_mask[2] ? grad_b : lora_B.new_empty({0})};
}

namespace {

// The torch-free CPU kernels, parallel over quantization blocks.
class CpuNf4Backend final : public Nf4Backend {
 public:
  explicit CpuNf4Backend(const at::Device&) {}
  void dequantize(const Nf4DequantParams& p) override {
    const int64_t nblocks = ceil_div(p.w.rows * p.w.cols, p.w.blocksize);
    at::parallel_for(0, nblocks, 64, [&](int64_t b0, int64_t b1) { nf4_dequantize_cpu(p, b0, b1); });
  }
  // The CPU BLAS on a dequantized weight is faster than a scalar fused loop.
  bool matmul(const Nf4MatmulParams&) override { return false; }
  bool lora_down(const Nf4LoraDownParams&) override { return false; }
  bool fuses_small_m() const override { return false; }
  void quantize(const void* x, Nf4Dtype dtype, int64_t n, int64_t blocksize, uint8_t* packed,
                float* absmax) override {
    at::parallel_for(0, ceil_div(n, blocksize), 64, [&](int64_t b0, int64_t b1) {
      nf4_quantize_cpu(x, dtype, n, blocksize, packed, absmax, b0, b1);
    });
  }
  void blockwise8(const float* x, int64_t n, int64_t blocksize, const float* code, uint8_t* out,
                  float* absmax) override {
    blockwise8_quantize_cpu(x, n, blocksize, code, out, absmax, 0, ceil_div(n, blocksize));
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedrl, CPU, m) { register_nf4_ops<CpuNf4Backend>(m); }

}  // namespace fusedrl
