// logp_rows: the row pass of the fused lm-head + log-softmax.
//
// Given a chunk of raw lm-head outputs `raw` (rows, vocab) = hidden @ W^T (+ b), the final logits are
//     z = softcap(raw) / temperature,      softcap(x) = c * tanh(x / c)   (identity when c <= 0)
// and per row this pass computes, in the accumulation type (double for double logits, float otherwise):
//     lse     = log(sum_v exp(z_v))
//     logp    = z[target] - lse
//     entropy = lse - sum_v softmax(z)_v * z_v
// and, on request, rewrites the chunk in place with the gradient of logp w.r.t. raw:
//     d logp / d raw_v = scale * (onehot(target)_v - softmax(z)_v) * dz_v/draw_v,
//     dz/draw = (1 - tanh^2(raw / c)) / temperature   (1 / temperature without softcap)
// where scale is 1 (kDirection: the forward pass of a frozen lm-head), a per-row coefficient (kScaledGrad: the
// backward pass of a trainable lm-head, with lse given from the forward), or the token's dL/dlogp evaluated from
// the logp just computed (kLossGrad: a trainable lm-head's gradients in the forward pass; see token_loss.h).
// Torch-free: raw pointers, sizes and (for CUDA) a stream.
#pragma once

#include <cstdint>

#include "token_loss.h"

#ifdef FUSEDRL_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace fusedrl {

enum class ScalarKind : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

enum class RowMode : int {
  kStats,        // logp, lse, entropy only; the chunk is left untouched
  kDirection,    // stats, then chunk <- d logp / d raw
  kScaledGrad,   // no stats: chunk <- row_scale * d logp / d raw, using lse_in
  kLossGrad,     // stats, then chunk <- dL/dlogp * d logp / d raw with dL/dlogp from `loss`
};

// Output and coefficient arrays hold the accumulation type: double when kind == kFloat64, else float.
struct LogpRowsParams {
  void* logits = nullptr;          // (rows, ld) row-major, first `vocab` columns used
  int64_t ld = 0;
  const int64_t* targets = nullptr;  // (rows), each in [0, vocab)
  int64_t rows = 0;
  int64_t vocab = 0;
  ScalarKind kind = ScalarKind::kFloat32;
  RowMode mode = RowMode::kStats;
  double inv_temperature = 1.0;
  double softcap = 0.0;            // <= 0: no softcap

  void* logp = nullptr;            // (rows), all modes but kScaledGrad
  void* lse = nullptr;             // (rows) or null, all modes but kScaledGrad
  void* entropy = nullptr;         // (rows) or null, all modes but kScaledGrad
  const void* lse_in = nullptr;    // (rows), kScaledGrad
  const void* row_scale = nullptr; // (rows), kScaledGrad
  TokenLossParams loss;            // kLossGrad; its arrays are indexed by the same row as `targets`
};

// Rows [row_begin, row_end) on the calling thread. Callers parallelise over row ranges.
void logp_rows_cpu(const LogpRowsParams& p, int64_t row_begin, int64_t row_end);

#ifdef FUSEDRL_WITH_CUDA
// All rows, one thread block per row, on `stream`. Returns the launch error, if any.
cudaError_t logp_rows_cuda(const LogpRowsParams& p, cudaStream_t stream);
#endif

}  // namespace fusedrl
