// token_loss: dL/dlogp of one token for the token-level GRPO-family losses, evaluated inside the row pass so
// that a trainable lm-head gets its gradients from the forward pass (three GEMMs instead of four).
//
// With r = exp(logp - old_logp) (1 when old_logp is null: on-policy) and A the token's advantage, the policy
// term of TRL's per-token loss and its derivative w.r.t. logp are
//   clipped (grpo, bnpo, dr_grpo, dapo): -min(c1 A, c2 A), c1 = min(r, delta), c2 = clamp(r, 1-eps_low, 1+eps_high)
//   cispo:  -sg(min(r, eps_high)) A logp                     -> -min(r, eps_high) A
//   sapo:   -sigmoid(tau (r - 1)) 4 / tau A, tau by sign of A -> -4 A s (1 - s) r
// following torch's derivative conventions (min of equal terms splits the gradient, clamp passes it at the
// bounds). The token's loss is policy_weight * policy term + kl_weight * k3, k3 = exp(ref - logp) - (ref - logp) - 1,
// where the weights carry the loss type's normaliser, the completion mask, the sampler correction and beta.
// With kl_ratio_weighted (TRL 1.16's use_bias_correction_kl) the KL term is kl_weight * k3 * r, whose derivative
// is kl_weight * r * (1 - exp(ref - logp) + k3): r depends on logp even on-policy (r = exp(logp - sg(logp)) = 1).
// The Python reference (fusedrl.ops.reference) is the ground truth these formulas are tested against.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FUSEDRL_HD __host__ __device__ __forceinline__
#else
#define FUSEDRL_HD inline
#endif

namespace fusedrl {

enum class PolicyLossKind : int { kClipped = 0, kCispo = 1, kSapo = 2 };

// Per-token arrays hold the accumulation type (double for double logits, float otherwise), indexed by row.
struct TokenLossParams {
  PolicyLossKind kind = PolicyLossKind::kClipped;
  const void* old_logp = nullptr;       // null: on-policy, r = 1
  const void* advantage = nullptr;      // required
  const void* ref_logp = nullptr;       // null: no KL term
  const void* policy_weight = nullptr;  // required
  const void* kl_weight = nullptr;      // required when ref_logp is set
  double epsilon_low = 0.2;
  double epsilon_high = 0.2;
  double delta = 0.0;                   // <= 0: no two-sided clipping
  double sapo_temperature_pos = 1.0;
  double sapo_temperature_neg = 1.05;
  bool kl_ratio_weighted = false;       // KL term times r (TRL's use_bias_correction_kl)
};

template <typename Acc>
FUSEDRL_HD Acc token_loss_grad(const TokenLossParams& p, int64_t row, Acc logp) {
  using std::exp;
  const Acc adv = static_cast<const Acc*>(p.advantage)[row];
  const Acc r = p.old_logp ? exp(logp - static_cast<const Acc*>(p.old_logp)[row]) : Acc(1);
  Acc policy;
  if (p.kind == PolicyLossKind::kCispo) {
    const Acc high = static_cast<Acc>(p.epsilon_high);
    policy = -(r < high ? r : high) * adv;
  } else if (p.kind == PolicyLossKind::kSapo) {
    const Acc tau = static_cast<Acc>(adv > Acc(0) ? p.sapo_temperature_pos : p.sapo_temperature_neg);
    const Acc s = Acc(1) / (Acc(1) + exp(-tau * (r - Acc(1))));
    policy = -Acc(4) * adv * s * (Acc(1) - s) * r;
  } else {
    const Acc lo = static_cast<Acc>(1.0 - p.epsilon_low), hi = static_cast<Acc>(1.0 + p.epsilon_high);
    const bool capped = p.delta > 0.0 && r > static_cast<Acc>(p.delta);
    const Acc c1 = capped ? static_cast<Acc>(p.delta) : r;
    const Acc c2 = r < lo ? lo : (r > hi ? hi : r);
    const Acc d1 = capped ? Acc(0) : r;                       // d c1 / d logp
    const Acc d2 = (r >= lo && r <= hi) ? r : Acc(0);         // d c2 / d logp
    const Acc t1 = c1 * adv, t2 = c2 * adv;
    policy = t1 < t2 ? -adv * d1 : (t1 > t2 ? -adv * d2 : -adv * (d1 + d2) / Acc(2));
  }
  Acc grad = static_cast<const Acc*>(p.policy_weight)[row] * policy;
  if (p.ref_logp) {
    const Acc d = static_cast<const Acc*>(p.ref_logp)[row] - logp;
    const Acc e = exp(d);
    const Acc kl_grad = p.kl_ratio_weighted ? r * (Acc(1) - e + (e - d - Acc(1))) : Acc(1) - e;
    grad += static_cast<const Acc*>(p.kl_weight)[row] * kl_grad;
  }
  return grad;
}

}  // namespace fusedrl
