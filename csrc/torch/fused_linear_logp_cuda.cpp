// fused_linear_logp_cuda.cpp: CUDA registration of the fused lm-head + log-softmax op. The chunk loop is the
// one in fused_linear_logp.cpp; CUDA supplies the row pass (csrc/kernels/logp_rows.cu) on the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fused_linear_logp.h"

namespace fusedrl {
namespace {

// Chunks one after another on the caller's stream. (Two side streams, so that one chunk's row pass could run
// beside the next chunk's GEMMs, measured no faster on an H200: cuBLAS fills every SM. See bench/RESULTS.md.)
class CudaBackend final : public ChunkBackend {
 public:
  explicit CudaBackend(const at::Tensor& hidden) : guard_(hidden.device()) {}
  void run_rows(const LogpRowsParams& p) override {
    const cudaError_t err = logp_rows_cuda(p, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "fused_linear_logp: row kernel launch failed: ", cudaGetErrorString(err));
  }
  // 256 MiB of logits at most, whatever N is.
  int64_t chunk_bytes() const override { return 256LL << 20; }

 private:
  const c10::cuda::CUDAGuard guard_;  // the op runs on hidden's device
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedrl, CUDA, m) { register_backend_ops<CudaBackend>(m); }

}  // namespace fusedrl
