// nf4_cuda.cpp: CUDA registration of the NF4 ops. The composition (scratch, cuBLAS GEMMs, LoRA folding) is the one
// in nf4.cpp; CUDA supplies the kernels of csrc/kernels/nf4.cu on the current stream of the op's device.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "nf4.h"

namespace fusedrl {
namespace {

void check_launch(const char* what, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "fusedrl ", what, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

class CudaNf4Backend final : public Nf4Backend {
 public:
  explicit CudaNf4Backend(const at::Device& device) : guard_(device) {}
  void dequantize(const Nf4DequantParams& p) override {
    check_launch("nf4_dequantize", nf4_dequantize_cuda(p, at::cuda::getCurrentCUDAStream()));
  }
  bool matmul(const Nf4MatmulParams& p) override {
    if (!nf4_matmul_cuda_supported(p)) return false;
    check_launch("nf4_lora_linear", nf4_matmul_cuda(p, at::cuda::getCurrentCUDAStream()));
    return true;
  }
  bool fuses_small_m() const override { return true; }
  bool lora_down(const Nf4LoraDownParams& p) override {
    if (!nf4_lora_down_cuda_supported(p)) return false;
    check_launch("nf4_lora_linear", nf4_lora_down_cuda(p, at::cuda::getCurrentCUDAStream()));
    return true;
  }
  void quantize(const void* x, Nf4Dtype dtype, int64_t n, int64_t blocksize, uint8_t* packed,
                float* absmax) override {
    check_launch("nf4_quantize",
                 nf4_quantize_cuda(x, dtype, n, blocksize, packed, absmax, at::cuda::getCurrentCUDAStream()));
  }
  void blockwise8(const float* x, int64_t n, int64_t blocksize, const float* code, uint8_t* out,
                  float* absmax) override {
    check_launch("blockwise8_quantize",
                 blockwise8_quantize_cuda(x, n, blocksize, code, out, absmax, at::cuda::getCurrentCUDAStream()));
  }

 private:
  const c10::cuda::CUDAGuard guard_;  // the op runs on its inputs' device
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedrl, CUDA, m) { register_nf4_ops<CudaNf4Backend>(m); }

}  // namespace fusedrl
