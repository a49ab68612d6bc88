// logp_rows_cpu: CPU reference implementation of the row pass described in logp_rows.h.
// Three sweeps over a row that stays in cache: max, then sum of exp and of exp * z, then (optionally) the
// gradient rewrite. Accumulates in double for double logits and in float otherwise.
#include <cmath>
#include <limits>

#include "half_cpu.h"
#include "logp_rows.h"

namespace fusedrl {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// element access per storage type

template <typename Storage> struct Element;
template <> struct Element<float> {
  static float load(const float* p) { return *p; }
  static void store(float* p, float v) { *p = v; }
};
template <> struct Element<double> {
  static double load(const double* p) { return *p; }
  static void store(double* p, double v) { *p = v; }
};
struct Fp16 { uint16_t bits; };
struct Bf16 { uint16_t bits; };
template <> struct Element<Fp16> {
  static float load(const Fp16* p) { return fp16_to_float(p->bits); }
  static void store(Fp16* p, float v) { p->bits = float_to_fp16(v); }
};
template <> struct Element<Bf16> {
  static float load(const Bf16* p) { return bf16_to_float(p->bits); }
  static void store(Bf16* p, float v) { p->bits = float_to_bf16(v); }
};

// ---------------------------------------------------------------------------------------------------------------
// one row

template <typename Storage, typename Acc>
void process_row(const LogpRowsParams& p, int64_t row) {
  Storage* raw = static_cast<Storage*>(p.logits) + row * p.ld;
  const int64_t target = p.targets[row];
  const Acc inv_t = static_cast<Acc>(p.inv_temperature);
  const bool capped = p.softcap > 0.0;
  const Acc cap = static_cast<Acc>(p.softcap);
  auto final_logit = [&](Acc x) { return (capped ? cap * std::tanh(x / cap) : x) * inv_t; };
  auto dz_draw = [&](Acc x) {
    if (!capped) return inv_t;
    const Acc th = std::tanh(x / cap);
    return (Acc(1) - th * th) * inv_t;
  };

  Acc lse;
  if (p.mode == RowMode::kScaledGrad) {
    lse = static_cast<const Acc*>(p.lse_in)[row];
  } else {
    Acc max_z = -std::numeric_limits<Acc>::infinity();
    for (int64_t v = 0; v < p.vocab; ++v) max_z = std::max(max_z, final_logit(Element<Storage>::load(raw + v)));
    Acc sum_exp = 0, sum_exp_z = 0;
    for (int64_t v = 0; v < p.vocab; ++v) {
      const Acc z = final_logit(Element<Storage>::load(raw + v));
      const Acc e = std::exp(z - max_z);
      sum_exp += e;
      sum_exp_z += e * (z - max_z);  // shifted by max_z so large logits lose no precision
    }
    lse = max_z + std::log(sum_exp);
    static_cast<Acc*>(p.logp)[row] = final_logit(Element<Storage>::load(raw + target)) - lse;
    if (p.lse) static_cast<Acc*>(p.lse)[row] = lse;
    if (p.entropy) static_cast<Acc*>(p.entropy)[row] = std::log(sum_exp) - sum_exp_z / sum_exp;
    if (p.mode == RowMode::kStats) return;
  }

  Acc scale = Acc(1);
  if (p.mode == RowMode::kScaledGrad) scale = static_cast<const Acc*>(p.row_scale)[row];
  if (p.mode == RowMode::kLossGrad) scale = token_loss_grad<Acc>(p.loss, row, static_cast<Acc*>(p.logp)[row]);
  for (int64_t v = 0; v < p.vocab; ++v) {
    const Acc x = Element<Storage>::load(raw + v);
    const Acc prob = std::exp(final_logit(x) - lse);
    const Acc onehot = v == target ? Acc(1) : Acc(0);
    Element<Storage>::store(raw + v, scale * (onehot - prob) * dz_draw(x));
  }
}

template <typename Storage, typename Acc>
void process_rows(const LogpRowsParams& p, int64_t row_begin, int64_t row_end) {
  for (int64_t row = row_begin; row < row_end; ++row) process_row<Storage, Acc>(p, row);
}

}  // namespace

void logp_rows_cpu(const LogpRowsParams& p, int64_t row_begin, int64_t row_end) {
  switch (p.kind) {
    case ScalarKind::kFloat32: return process_rows<float, float>(p, row_begin, row_end);
    case ScalarKind::kFloat64: return process_rows<double, double>(p, row_begin, row_end);
    case ScalarKind::kFloat16: return process_rows<Fp16, float>(p, row_begin, row_end);
    case ScalarKind::kBFloat16: return process_rows<Bf16, float>(p, row_begin, row_end);
  }
}

}  // namespace fusedrl
