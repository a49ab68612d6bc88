// fused_linear_logp.cpp: argument checks and the chunk loop of the fused lm-head + log-softmax op
// (see fused_linear_logp.h), plus its CPU registration.
#include "fused_linear_logp.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

namespace fusedrl {
namespace {

ScalarKind scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kDouble: return ScalarKind::kFloat64;
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    default: TORCH_CHECK(false, "fused_linear_logp: hidden must be float16, bfloat16, float32 or float64, got ", t);
  }
}

at::ScalarType accumulation_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& targets, double temperature, std::optional<double> logit_softcap,
                  std::optional<int64_t> chunk_size) {
  TORCH_CHECK(hidden.dim() == 2, "fused_linear_logp: hidden must be 2-D (N, H), got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, "fused_linear_logp: weight must be 2-D (V, H), got shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == hidden.size(1), "fused_linear_logp: weight (V, H) must have H = hidden.size(1) = ",
              hidden.size(1), ", got weight shape ", weight.sizes());
  TORCH_CHECK(weight.size(0) >= 1, "fused_linear_logp: weight must have at least one row (vocabulary entry)");
  scalar_kind(hidden.scalar_type());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "fused_linear_logp: weight dtype ",
              weight.scalar_type(), " must equal hidden dtype ", hidden.scalar_type());
  TORCH_CHECK(weight.device() == hidden.device(), "fused_linear_logp: weight is on ", weight.device(),
              " but hidden is on ", hidden.device());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "fused_linear_logp: bias must have shape (",
                weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type(), "fused_linear_logp: bias dtype ", bias->scalar_type(),
                " must equal hidden dtype ", hidden.scalar_type());
    TORCH_CHECK(bias->device() == hidden.device(), "fused_linear_logp: bias is on ", bias->device(),
                " but hidden is on ", hidden.device());
  }
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0),
              "fused_linear_logp: targets must have shape (N,) = (", hidden.size(0), ",), got ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "fused_linear_logp: targets must be int64, got ",
              targets.scalar_type());
  TORCH_CHECK(targets.device() == hidden.device(), "fused_linear_logp: targets is on ", targets.device(),
              " but hidden is on ", hidden.device());
  TORCH_CHECK(temperature > 0.0, "fused_linear_logp: temperature must be > 0, got ", temperature);
  TORCH_CHECK(!logit_softcap || *logit_softcap > 0.0, "fused_linear_logp: logit_softcap must be > 0 or None, got ",
              logit_softcap.value_or(0.0));
  TORCH_CHECK(!chunk_size || *chunk_size >= 1, "fused_linear_logp: chunk_size must be >= 1, got ",
              chunk_size.value_or(0));
  if (targets.numel() > 0) {
    const auto [lo, hi] = at::aminmax(targets);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK(lo_v >= 0 && hi_v < weight.size(0), "fused_linear_logp: target ids must lie in [0, ", weight.size(0),
                "), got values in [", lo_v, ", ", hi_v, "]");
  }
}

// Rows per chunk: the backend's logits budget, rounded down to a multiple of the GEMM tile height so that no
// chunk GEMM runs a partly empty row of tiles (1040 rows would waste 10% of an H100/H200 GEMM).
int64_t rows_per_chunk(const at::Tensor& hidden, int64_t vocab, std::optional<int64_t> chunk_size,
                       const ChunkBackend& backend) {
  constexpr int64_t kTileRows = 256;
  if (chunk_size) return *chunk_size;
  const int64_t rows = std::max<int64_t>(1, backend.chunk_bytes() / (vocab * hidden.element_size()));
  return rows > kTileRows ? rows / kTileRows * kTileRows : rows;
}

// logits <- hidden_chunk @ weight^T (+ bias)
void chunk_logits(at::Tensor& logits, const at::Tensor& hidden_chunk, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  if (bias) {
    at::addmm_out(logits, *bias, hidden_chunk, weight.t());
  } else {
    at::mm_out(logits, hidden_chunk, weight.t());
  }
}

LogpRowsParams row_params(at::Tensor& logits, const at::Tensor& targets, int64_t start, double temperature,
                          std::optional<double> logit_softcap, RowMode mode) {
  LogpRowsParams p;
  p.logits = logits.data_ptr();
  p.ld = logits.stride(0);
  p.targets = targets.data_ptr<int64_t>() + start;
  p.rows = logits.size(0);
  p.vocab = logits.size(1);
  p.kind = scalar_kind(logits.scalar_type());
  p.mode = mode;
  p.inv_temperature = 1.0 / temperature;
  p.softcap = logit_softcap.value_or(0.0);
  return p;
}

// Gradients w.r.t. hidden, weight and bias (each only if requested, else an empty tensor), accumulated from
// chunks of d loss / d raw logits: grad_hidden[chunk] = G @ W, grad_weight += G^T @ h, grad_bias += sum_rows G.
struct ChunkGradients {
  at::Tensor hidden, weight, bias;

  ChunkGradients(const at::Tensor& hidden_in, const at::Tensor& weight_in, bool has_bias, std::array<bool, 3> mask)
      : hidden(mask[0] ? at::empty({hidden_in.size(0), hidden_in.size(1)}, hidden_in.options())
                       : at::empty({0}, hidden_in.options())),
        weight(mask[1] ? at::zeros_like(weight_in, at::MemoryFormat::Contiguous) : at::empty({0}, weight_in.options())),
        bias(mask[2] && has_bias ? at::zeros({weight_in.size(0)}, weight_in.options())
                                 : at::empty({0}, weight_in.options())) {}

  bool any() const { return hidden.numel() > 0 || weight.numel() > 0 || bias.numel() > 0; }

  void add(const at::Tensor& grad_logits, const at::Tensor& hidden_chunk, const at::Tensor& weight_in,
           int64_t start) {
    if (hidden.numel() > 0) {
      at::Tensor out = hidden.narrow(0, start, grad_logits.size(0));
      at::mm_out(out, grad_logits, weight_in);
    }
    if (weight.numel() > 0) weight.addmm_(grad_logits.t(), hidden_chunk);
    if (bias.numel() > 0) bias.add_(grad_logits.sum(0));
  }
};

// Pointer to element `start` of a 1-D accumulation-type tensor, or null for an empty one.
void* acc_ptr(const at::Tensor& t, int64_t start) {
  if (t.numel() == 0) return nullptr;
  return static_cast<char*>(t.data_ptr()) + start * t.element_size();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_logp(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, std::optional<double> logit_softcap, bool return_entropy,
    bool compute_grad_direction, std::optional<int64_t> chunk_size, ChunkBackend& backend) {
  check_inputs(hidden, weight, bias, targets, temperature, logit_softcap, chunk_size);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const auto acc_options = hidden.options().dtype(accumulation_type(hidden.scalar_type()));
  at::Tensor logp = at::empty({n}, acc_options);
  at::Tensor lse = at::empty({n}, acc_options);
  at::Tensor entropy = at::empty({return_entropy ? n : 0}, acc_options);
  at::Tensor grad_direction =
      compute_grad_direction ? at::empty({n, hidden.size(1)}, hidden.options()) : at::empty({0}, hidden.options());
  const at::Tensor targets_c = targets.contiguous();
  const int64_t chunk = rows_per_chunk(hidden, vocab, chunk_size, backend);
  at::Tensor buffer = at::empty({std::min(chunk, std::max<int64_t>(n, 1)), vocab}, hidden.options());

  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t rows = std::min(chunk, n - start);
    at::Tensor logits = buffer.narrow(0, 0, rows);
    chunk_logits(logits, hidden.narrow(0, start, rows), weight, bias);
    LogpRowsParams p = row_params(logits, targets_c, start, temperature, logit_softcap,
                                  compute_grad_direction ? RowMode::kDirection : RowMode::kStats);
    p.logp = acc_ptr(logp, start);
    p.lse = acc_ptr(lse, start);
    p.entropy = return_entropy ? acc_ptr(entropy, start) : nullptr;
    backend.run_rows(p);
    if (compute_grad_direction) {
      at::Tensor out = grad_direction.narrow(0, start, rows);
      at::mm_out(out, logits, weight);
    }
  }
  return {logp, entropy, lse, grad_direction};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_logp_backward(
    const at::Tensor& grad_logp, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse, double temperature,
    std::optional<double> logit_softcap, std::array<bool, 3> output_mask, std::optional<int64_t> chunk_size,
    ChunkBackend& backend) {
  check_inputs(hidden, weight, bias, targets, temperature, logit_softcap, chunk_size);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const auto acc_type = accumulation_type(hidden.scalar_type());
  TORCH_CHECK(grad_logp.dim() == 1 && grad_logp.size(0) == n, "fused_linear_logp_backward: grad_logp must have shape (",
              n, ",), got ", grad_logp.sizes());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == n && lse.scalar_type() == acc_type,
              "fused_linear_logp_backward: lse must be (", n, ",) of dtype ", acc_type, ", got ", lse.sizes(), " ",
              lse.scalar_type());
  TORCH_CHECK(grad_logp.device() == hidden.device() && lse.device() == hidden.device(),
              "fused_linear_logp_backward: grad_logp and lse must be on ", hidden.device());
  ChunkGradients grads(hidden, weight, bias.has_value(), output_mask);
  if (!grads.any() || n == 0) return {grads.hidden, grads.weight, grads.bias};

  const at::Tensor scale = grad_logp.to(acc_type).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor targets_c = targets.contiguous();
  const int64_t chunk = rows_per_chunk(hidden, vocab, chunk_size, backend);
  at::Tensor buffer = at::empty({std::min(chunk, std::max<int64_t>(n, 1)), vocab}, hidden.options());

  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t rows = std::min(chunk, n - start);
    const at::Tensor h = hidden.narrow(0, start, rows);
    at::Tensor logits = buffer.narrow(0, 0, rows);
    chunk_logits(logits, h, weight, bias);
    LogpRowsParams p = row_params(logits, targets_c, start, temperature, logit_softcap, RowMode::kScaledGrad);
    p.lse_in = acc_ptr(lse_c, start);
    p.row_scale = acc_ptr(scale, start);
    backend.run_rows(p);
    grads.add(logits, h, weight, start);
  }
  return {grads.hidden, grads.weight, grads.bias};
}

TokenLossInputs token_loss_inputs(const std::optional<at::Tensor>& old_logp, const at::Tensor& advantages,
                                  const std::optional<at::Tensor>& ref_logp, const at::Tensor& policy_weight,
                                  const at::Tensor& kl_weight, int64_t loss_kind, double epsilon_low,
                                  double epsilon_high, std::optional<double> delta, double sapo_temperature_pos,
                                  double sapo_temperature_neg, bool kl_ratio_weighted) {
  TORCH_CHECK(loss_kind >= 0 && loss_kind <= 2, "fused_linear_token_loss: loss_kind must be 0 (clipped), 1 (cispo) "
              "or 2 (sapo), got ", loss_kind);
  TORCH_CHECK(!delta || *delta > 0.0, "fused_linear_token_loss: delta must be > 0 or None, got ", delta.value_or(0));
  TokenLossInputs inputs{old_logp, advantages, ref_logp, policy_weight, kl_weight, {}};
  inputs.scalars.kind = static_cast<PolicyLossKind>(loss_kind);
  inputs.scalars.epsilon_low = epsilon_low;
  inputs.scalars.epsilon_high = epsilon_high;
  inputs.scalars.delta = delta.value_or(0.0);
  inputs.scalars.sapo_temperature_pos = sapo_temperature_pos;
  inputs.scalars.sapo_temperature_neg = sapo_temperature_neg;
  inputs.scalars.kl_ratio_weighted = kl_ratio_weighted;
  return inputs;
}

namespace {

// Each per-token input: (N,), the accumulation dtype, on hidden's device; made contiguous.
at::Tensor per_token(const at::Tensor& t, const char* name, const at::Tensor& hidden) {
  const auto acc = accumulation_type(hidden.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == hidden.size(0), "fused_linear_token_loss: ", name, " must have shape (",
              hidden.size(0), ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, "fused_linear_token_loss: ", name, " must be ", acc, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == hidden.device(), "fused_linear_token_loss: ", name, " is on ", t.device(),
              " but hidden is on ", hidden.device());
  return t.contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_token_loss(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, std::optional<double> logit_softcap, bool return_entropy,
    const TokenLossInputs& loss, std::array<bool, 3> output_mask, std::optional<int64_t> chunk_size,
    ChunkBackend& backend) {
  check_inputs(hidden, weight, bias, targets, temperature, logit_softcap, chunk_size);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const at::Tensor advantages = per_token(loss.advantages, "advantages", hidden);
  const at::Tensor policy_weight = per_token(loss.policy_weight, "policy_weight", hidden);
  const at::Tensor kl_weight = per_token(loss.kl_weight, "kl_weight", hidden);
  const std::optional<at::Tensor> old_logp =
      loss.old_logp ? std::optional<at::Tensor>(per_token(*loss.old_logp, "old_logp", hidden)) : std::nullopt;
  const std::optional<at::Tensor> ref_logp =
      loss.ref_logp ? std::optional<at::Tensor>(per_token(*loss.ref_logp, "ref_logp", hidden)) : std::nullopt;

  const auto acc_options = hidden.options().dtype(accumulation_type(hidden.scalar_type()));
  at::Tensor logp = at::empty({n}, acc_options);
  at::Tensor entropy = at::empty({return_entropy ? n : 0}, acc_options);
  ChunkGradients grads(hidden, weight, bias.has_value(), output_mask);

  const at::Tensor targets_c = targets.contiguous();
  const int64_t chunk = rows_per_chunk(hidden, vocab, chunk_size, backend);
  at::Tensor buffer = at::empty({std::min(chunk, std::max<int64_t>(n, 1)), vocab}, hidden.options());
  const bool want_grads = grads.any();

  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t rows = std::min(chunk, n - start);
    const at::Tensor h = hidden.narrow(0, start, rows);
    at::Tensor logits = buffer.narrow(0, 0, rows);
    chunk_logits(logits, h, weight, bias);
    LogpRowsParams p = row_params(logits, targets_c, start, temperature, logit_softcap,
                                  want_grads ? RowMode::kLossGrad : RowMode::kStats);
    p.logp = acc_ptr(logp, start);
    p.entropy = return_entropy ? acc_ptr(entropy, start) : nullptr;
    p.loss = loss.scalars;
    p.loss.advantage = acc_ptr(advantages, start);
    p.loss.policy_weight = acc_ptr(policy_weight, start);
    p.loss.kl_weight = acc_ptr(kl_weight, start);
    p.loss.old_logp = old_logp ? acc_ptr(*old_logp, start) : nullptr;
    p.loss.ref_logp = ref_logp ? acc_ptr(*ref_logp, start) : nullptr;
    backend.run_rows(p);
    if (want_grads) grads.add(logits, h, weight, start);
  }
  return {logp, entropy, grads.hidden, grads.weight, grads.bias};
}

// ---------------------------------------------------------------------------------------------------------------
// CPU registration

namespace {

// Chunks one after another; the row pass parallel over rows.
class CpuBackend final : public ChunkBackend {
 public:
  explicit CpuBackend(const at::Tensor& /*hidden*/) {}
  void run_rows(const LogpRowsParams& p) override {
    // At least ~64K logits per task: waking a thread costs more than a few small rows.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(p.vocab, 1));
    at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) { logp_rows_cpu(p, begin, end); });
  }
  // Small enough to stay in the last-level cache between the GEMM and the row pass.
  int64_t chunk_bytes() const override { return 16LL << 20; }
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedrl, CPU, m) { register_backend_ops<CpuBackend>(m); }

}  // namespace fusedrl
