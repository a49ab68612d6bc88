// decode_attention_cuda.cpp: CUDA registration of the decode-step ops. Checks and outputs are the ones in
// decode_attention.cpp; CUDA supplies the kernels of csrc/kernels/decode_attention.cu on the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "decode_attention.h"

namespace fusedrl {
namespace {

void check_launch(const char* what, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "fusedrl ", what, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

class CudaAttentionBackend final : public AttentionBackend {
 public:
  explicit CudaAttentionBackend(const at::Device& device) : guard_(device) {}
  void rotary_cache_write(const RotaryCacheWriteParams& p) override {
    TORCH_CHECK(p.dtype != AttnDtype::kFloat64, "rotary_cache_write: float64 runs on the CPU only");
    check_launch("rotary_cache_write", rotary_cache_write_cuda(p, at::cuda::getCurrentCUDAStream()));
  }
  void rms_norm(const RmsNormParams& p) override {
    TORCH_CHECK(p.dtype != AttnDtype::kFloat64, "rms_norm: float64 runs on the CPU only");
    check_launch("rms_norm", rms_norm_cuda(p, at::cuda::getCurrentCUDAStream()));
  }
  // Enough blocks for two waves over the SMs when rows x kv heads alone are fewer, at least 64 keys per split.
  int64_t splits(const DecodeAttentionParams& p) override {
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t blocks = std::max<int64_t>(1, p.batch * p.kv_heads);
    const int64_t wanted = (2 * sms + blocks - 1) / blocks;
    return std::max<int64_t>(1, std::min<int64_t>(wanted, (p.length + 63) / 64));
  }
  void decode_attention(const DecodeAttentionParams& p) override {
    TORCH_CHECK(p.dtype != AttnDtype::kFloat64, "decode_attention: float64 runs on the CPU only");
    TORCH_CHECK(decode_attention_cuda_supported(p.head_dim, p.heads / p.kv_heads),
                "decode_attention: CUDA supports head dimension 64 or 128 and up to 16 query heads per kv head, got "
                "head dimension ", p.head_dim, " and ", p.heads / p.kv_heads, " query heads per kv head");
    const int64_t bytes = p.dtype == AttnDtype::kFloat32 ? 4 : 2;
    TORCH_CHECK(reinterpret_cast<uintptr_t>(p.cache_k) % 16 == 0 && reinterpret_cast<uintptr_t>(p.cache_v) % 16 == 0 &&
                    (p.cache_row * bytes) % 16 == 0 && (p.cache_head * bytes) % 16 == 0 && (p.cache_pos * bytes) % 16 == 0,
                "decode_attention: the caches must be 16-byte aligned with strides of whole 16-byte units "
                "(the kernel loads 16 bytes at a time)");
    check_launch("decode_attention", decode_attention_cuda(p, at::cuda::getCurrentCUDAStream()));
  }

 private:
  const c10::cuda::CUDAGuard guard_;  // the op runs on q's device
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedrl, CUDA, m) { register_decode_attention_ops<CudaAttentionBackend>(m); }

}  // namespace fusedrl
