// CPU references of rotary_cache_write and decode_attention (see decode_attention.h).
#include <cmath>
#include <limits>
#include <vector>

#include "decode_attention.h"
#include "half_cpu.h"

namespace fusedrl {
namespace {

// Storage type <-> the arithmetic type (float for 16-bit storage and float32, double for float64).
template <typename S> struct Cpu;
template <> struct Cpu<float> {
  using Acc = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};
template <> struct Cpu<double> {
  using Acc = double;
  static double load(double x) { return x; }
  static double store(double x) { return x; }
};
struct Bf16 { uint16_t bits; };
struct Fp16 { uint16_t bits; };
template <> struct Cpu<Bf16> {
  using Acc = float;
  static float load(Bf16 x) { return bf16_to_float(x.bits); }
  static Bf16 store(float x) { return Bf16{float_to_bf16(x)}; }
};
template <> struct Cpu<Fp16> {
  using Acc = float;
  static float load(Fp16 x) { return fp16_to_float(x.bits); }
  static Fp16 store(float x) { return Fp16{float_to_fp16(x)}; }
};

// x rounded to the storage type, back in the arithmetic type.
template <typename S> typename Cpu<S>::Acc round_to(typename Cpu<S>::Acc x) {
  return Cpu<S>::load(Cpu<S>::store(x));
}

// One head (D values): optional RMSNorm with weight `norm`, then rope; writes D values to `out`.
template <typename S>
void norm_rope_head(const S* x, const S* cos, const S* sin, const S* norm, double eps, int64_t d, S* out) {
  using Acc = typename Cpu<S>::Acc;
  std::vector<Acc> v(d);
  for (int64_t i = 0; i < d; ++i) v[i] = Cpu<S>::load(x[i]);
  if (norm != nullptr) {
    Acc sum_sq = 0;
    for (int64_t i = 0; i < d; ++i) sum_sq += v[i] * v[i];
    const Acc inv = Acc(1) / std::sqrt(sum_sq / Acc(d) + Acc(eps));
    for (int64_t i = 0; i < d; ++i) v[i] = round_to<S>(Cpu<S>::load(norm[i]) * round_to<S>(v[i] * inv));
  }
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const Acc rotated = i < half ? -v[i + half] : v[i - half];
    const Acc a = round_to<S>(v[i] * Cpu<S>::load(cos[i]));
    const Acc b = round_to<S>(rotated * Cpu<S>::load(sin[i]));
    out[i] = Cpu<S>::store(a + b);
  }
}

template <typename S>
void rotary_cache_write(const RotaryCacheWriteParams& p) {
  const int64_t slot = *p.slot, d = p.head_dim;
  for (int64_t b = 0; b < p.batch; ++b) {
    const S* cos = static_cast<const S*>(p.cos) + b * d;
    const S* sin = static_cast<const S*>(p.sin) + b * d;
    for (int64_t h = 0; h < p.heads; ++h) {
      norm_rope_head<S>(static_cast<const S*>(p.q) + b * p.q_row + h * d, cos, sin,
                        static_cast<const S*>(p.q_norm), p.eps, d, static_cast<S*>(p.q_out) + (b * p.heads + h) * d);
    }
    for (int64_t h = 0; h < p.kv_heads; ++h) {
      const int64_t at = b * p.cache_row + h * p.cache_head + slot * p.cache_pos;
      norm_rope_head<S>(static_cast<const S*>(p.k) + b * p.kv_row + h * d, cos, sin,
                        static_cast<const S*>(p.k_norm), p.eps, d, static_cast<S*>(p.cache_k) + at);
      const S* v = static_cast<const S*>(p.v) + b * p.kv_row + h * d;
      S* v_out = static_cast<S*>(p.cache_v) + at;
      for (int64_t i = 0; i < d; ++i) v_out[i] = v[i];
    }
  }
}

template <typename S>
void decode_attention(const DecodeAttentionParams& p) {
  const int64_t slot = *p.slot, d = p.head_dim, group = p.heads / p.kv_heads;
  std::vector<double> scores, acc(d);
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t first = p.start[b];
    for (int64_t h = 0; h < p.heads; ++h) {
      const S* q = static_cast<const S*>(p.q) + (b * p.heads + h) * d;
      const int64_t base = b * p.cache_row + (h / group) * p.cache_head;
      const S* keys = static_cast<const S*>(p.cache_k) + base;
      const S* values = static_cast<const S*>(p.cache_v) + base;
      scores.clear();
      double top = -std::numeric_limits<double>::infinity();
      for (int64_t t = first; t <= slot; ++t) {
        double dot = 0;
        for (int64_t i = 0; i < d; ++i) dot += double(Cpu<S>::load(q[i])) * double(Cpu<S>::load(keys[t * p.cache_pos + i]));
        scores.push_back(dot * p.scale);
        top = std::max(top, scores.back());
      }
      std::fill(acc.begin(), acc.end(), 0.0);
      double total = 0;
      for (int64_t t = first; t <= slot; ++t) {
        const double w = std::exp(scores[t - first] - top);
        total += w;
        for (int64_t i = 0; i < d; ++i) acc[i] += w * double(Cpu<S>::load(values[t * p.cache_pos + i]));
      }
      S* out = static_cast<S*>(p.out) + (b * p.heads + h) * d;
      for (int64_t i = 0; i < d; ++i) {
        const double value = total > 0 ? acc[i] / total : 0.0;
        out[i] = Cpu<S>::store(static_cast<typename Cpu<S>::Acc>(value));
      }
    }
  }
}

template <typename S>
void rms_norm(const RmsNormParams& p, int64_t row_begin, int64_t row_end) {
  using Acc = typename Cpu<S>::Acc;
  const S* weight = static_cast<const S*>(p.weight);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const S* x = static_cast<const S*>(p.x) + r * p.x_row;
    S* out = static_cast<S*>(p.out) + r * p.cols;
    Acc sum_sq = 0;
    for (int64_t i = 0; i < p.cols; ++i) sum_sq += Cpu<S>::load(x[i]) * Cpu<S>::load(x[i]);
    const Acc inv = Acc(1) / std::sqrt(sum_sq / Acc(p.cols) + Acc(p.eps));
    for (int64_t i = 0; i < p.cols; ++i) {
      out[i] = Cpu<S>::store(Cpu<S>::load(weight[i]) * round_to<S>(Cpu<S>::load(x[i]) * inv));
    }
  }
}

}  // namespace

void rms_norm_cpu(const RmsNormParams& p, int64_t row_begin, int64_t row_end) {
  switch (p.dtype) {
    case AttnDtype::kFloat32: return rms_norm<float>(p, row_begin, row_end);
    case AttnDtype::kFloat64: return rms_norm<double>(p, row_begin, row_end);
    case AttnDtype::kFloat16: return rms_norm<Fp16>(p, row_begin, row_end);
    case AttnDtype::kBFloat16: return rms_norm<Bf16>(p, row_begin, row_end);
  }
}

void rotary_cache_write_cpu(const RotaryCacheWriteParams& p) {
  switch (p.dtype) {
    case AttnDtype::kFloat32: return rotary_cache_write<float>(p);
    case AttnDtype::kFloat64: return rotary_cache_write<double>(p);
    case AttnDtype::kFloat16: return rotary_cache_write<Fp16>(p);
    case AttnDtype::kBFloat16: return rotary_cache_write<Bf16>(p);
  }
}

void decode_attention_cpu(const DecodeAttentionParams& p) {
  switch (p.dtype) {
    case AttnDtype::kFloat32: return decode_attention<float>(p);
    case AttnDtype::kFloat64: return decode_attention<double>(p);
    case AttnDtype::kFloat16: return decode_attention<Fp16>(p);
    case AttnDtype::kBFloat16: return decode_attention<Bf16>(p);
  }
}

}  // namespace fusedrl
