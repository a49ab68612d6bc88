// nf4 (torch side): argument checks and the composition of the NF4 ops (csrc/kernels/nf4.h), shared by the CPU
// and CUDA registrations. A device supplies an Nf4Backend (the torch-free kernels on its stream); everything else
// (scratch buffers, GEMMs through ATen: cuBLAS on CUDA, the CPU BLAS otherwise) is written once here.
//
// A weight may be one quantized tensor or several independently quantized shards stacked along N (a fused qkv or
// gate_up projection); the schemas take parallel lists, one entry per shard:
//   packed[i] uint8 (ceil(rows[i] * cols / 2), ...); absmax[i] float32 (nblocks_i) plain, or uint8 when nested;
//   nested_absmax[i] float32 (ceil(nblocks_i / 256)), nested_code[i] float32 (256), offset[i]: nested only
//   (empty lists for plain weights); all shards share cols and blocksize.
//
// nf4_lora_linear, x (M, K), W (N, K) in NF4, A (r, K), B (N, r):
//   y = x @ W^T + s * (x @ A^T) @ B^T (+ bias)
// M <= 16 (CUDA, bf16/fp16): one small kernel computes s x A^T in float32, then one fused kernel per shard reads the
// 4-bit W once and adds the LoRA term and bias in its epilogue.
// Larger M: W is dequantized into a scratch and one GEMM does the rest, with the LoRA term folded in without a
// second full pass over the M x N output:
//   K < N:  y = [x | s x A^T] @ [W | B]^T           (the scratch is (N, K + r); copying x costs M x K)
//   else:   y = (x A^T) B^T, then y = s y + x @ W^T as the main GEMM's beta = s epilogue (one extra read of y);
//           with a bias: y = bias + s (x A^T) B^T (alpha = s), then y += x @ W^T (beta = 1)
// Backward (no weight gradient): g = grad_y, u = s g B (M, r)
//   dX = [g | u] @ [W ; A]  when N < K, else dX = u @ A, then dX += g @ W (beta = 1)
//   dA = u^T @ x,  dB = s g^T @ (x A^T)   (tall-skinny GEMMs in the adapters' dtype)
// The LoRA products run in the adapters' dtype (x is converted when it differs); the main GEMM in x's dtype.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "../kernels/nf4.h"

namespace fusedrl {

class Nf4Backend {
 public:
  virtual ~Nf4Backend() = default;
  virtual void dequantize(const Nf4DequantParams& p) = 0;
  // Whether this device has the fused small-M kernels at all (then nf4_matmul_cuda_supported says for which operands).
  virtual bool fuses_small_m() const = 0;
  // The fused small-M matmul; returns false when this device has none for these operands.
  virtual bool matmul(const Nf4MatmulParams& p) = 0;
  // The small-M LoRA down-projection into float32; returns false when this device has none for these operands.
  virtual bool lora_down(const Nf4LoraDownParams& p) = 0;
  virtual void quantize(const void* x, Nf4Dtype dtype, int64_t n, int64_t blocksize, uint8_t* packed,
                        float* absmax) = 0;
  virtual void blockwise8(const float* x, int64_t n, int64_t blocksize, const float* code, uint8_t* out,
                          float* absmax) = 0;
};

// The shards of one weight, checked.
struct Nf4Shards {
  std::vector<Nf4Weight> weights;
  int64_t rows = 0;  // sum over shards (N)
  int64_t cols = 0;  // K
  at::Device device = at::kCPU;
};

Nf4Shards nf4_shards(const char* op, const at::Device& device, at::TensorList packed, at::TensorList absmax,
                     at::TensorList nested_absmax, at::TensorList nested_code, at::ArrayRef<double> offset,
                     at::IntArrayRef rows, int64_t cols, int64_t blocksize);

at::Tensor nf4_quantize_impl(Nf4Backend& backend, const at::Tensor& weight, int64_t blocksize, at::Tensor& absmax);

std::tuple<at::Tensor, at::Tensor> blockwise8_quantize_impl(Nf4Backend& backend, const at::Tensor& values,
                                                            const at::Tensor& code, int64_t blocksize);

// W (N, K) of `dtype` (float32, float16, bfloat16 or float64) into a fresh tensor.
at::Tensor nf4_dequantize_impl(Nf4Backend& backend, const Nf4Shards& w, at::ScalarType dtype);

at::Tensor nf4_lora_linear_impl(Nf4Backend& backend, const at::Tensor& x, const Nf4Shards& w, const at::Tensor& lora_A,
                                const at::Tensor& lora_B, double scaling, const std::optional<at::Tensor>& bias);

std::tuple<at::Tensor, at::Tensor, at::Tensor> nf4_lora_linear_backward_impl(
    Nf4Backend& backend, const at::Tensor& grad_y, const at::Tensor& x, const Nf4Shards& w, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, std::array<bool, 3> output_mask);

// The schemas' signatures bound to one backend (constructed per call from the op's device).
template <typename Backend>
struct Nf4Ops {
  static std::tuple<at::Tensor, at::Tensor> quantize(const at::Tensor& weight, int64_t blocksize) {
    Backend backend(weight.device());
    at::Tensor absmax;
    at::Tensor packed = nf4_quantize_impl(backend, weight, blocksize, absmax);
    return {packed, absmax};
  }

  static std::tuple<at::Tensor, at::Tensor> blockwise8(const at::Tensor& values, const at::Tensor& code,
                                                       int64_t blocksize) {
    Backend backend(values.device());
    return blockwise8_quantize_impl(backend, values, code, blocksize);
  }

  static at::Tensor dequantize(at::TensorList packed, at::TensorList absmax, at::TensorList nested_absmax,
                               at::TensorList nested_code, at::ArrayRef<double> offset, at::IntArrayRef rows,
                               int64_t cols, int64_t blocksize, at::ScalarType dtype) {
    TORCH_CHECK(!packed.empty(), "nf4_dequantize: packed must hold at least one shard");
    Backend backend(packed[0].device());
    const Nf4Shards w = nf4_shards("nf4_dequantize", packed[0].device(), packed, absmax, nested_absmax, nested_code,
                                   offset, rows, cols, blocksize);
    return nf4_dequantize_impl(backend, w, dtype);
  }

  static at::Tensor lora_linear(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                                at::TensorList nested_absmax, at::TensorList nested_code, at::ArrayRef<double> offset,
                                at::IntArrayRef rows, int64_t blocksize, const at::Tensor& lora_A,
                                const at::Tensor& lora_B, double scaling, const std::optional<at::Tensor>& bias) {
    Backend backend(x.device());
    const Nf4Shards w = nf4_shards("nf4_lora_linear", x.device(), packed, absmax, nested_absmax, nested_code, offset,
                                   rows, x.dim() > 0 ? x.size(-1) : 0, blocksize);
    return nf4_lora_linear_impl(backend, x, w, lora_A, lora_B, scaling, bias);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_backward(
      const at::Tensor& grad_y, const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
      at::TensorList nested_absmax, at::TensorList nested_code, at::ArrayRef<double> offset, at::IntArrayRef rows,
      int64_t blocksize, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
      std::array<bool, 3> output_mask) {
    Backend backend(x.device());
    const Nf4Shards w = nf4_shards("nf4_lora_linear_backward", x.device(), packed, absmax, nested_absmax,
                                   nested_code, offset, rows, x.dim() > 0 ? x.size(-1) : 0, blocksize);
    return nf4_lora_linear_backward_impl(backend, grad_y, x, w, lora_A, lora_B, scaling, output_mask);
  }
};

template <typename Backend>
void register_nf4_ops(torch::Library& m) {
  m.impl("nf4_quantize", &Nf4Ops<Backend>::quantize);
  m.impl("blockwise8_quantize", &Nf4Ops<Backend>::blockwise8);
  m.impl("nf4_dequantize", &Nf4Ops<Backend>::dequantize);
  m.impl("nf4_lora_linear", &Nf4Ops<Backend>::lora_linear);
  m.impl("nf4_lora_linear_backward", &Nf4Ops<Backend>::lora_linear_backward);
}

}  // namespace fusedrl
