// bench_logp_rows: validates and times the torch-free row pass fusedrl::logp_rows_cuda (csrc/kernels/logp_rows.h).
//
// What it measures. For one chunk of raw lm-head outputs `raw` (rows, ld), first `vocab` columns used, the kernel
// computes per row lse = logsumexp(z), logp = z[target] - lse, entropy = lse - sum softmax(z) * z with
// z = softcap(raw) / temperature, and in kDirection / kScaledGrad rewrites the chunk in place with
// (row_scale *) d logp / d raw. One thread block per row, in the chunk's dtype (bf16 or fp32), float accumulation.
//   raw        (rows, ld)  bf16 | fp32, rows = 1024 (one chunk of the fused op), ld = vocab or vocab padded to 16 B
//   targets    (rows)      int64
//   logp, lse, entropy     (rows) fp32        kStats, kDirection
//   lse_in, row_scale      (rows) fp32        kScaledGrad
// Vocab sizes: 151936 (Qwen2.5/Qwen3), 128256 (Llama 3), 50257 (GPT-2: odd, so rows are not 16-byte aligned and
// the kernel takes its scalar path; run again with ld padded to 50264 for the vector path with a tail).
//
// Every configuration is validated before it is timed:
//   ref64  fusedrl::logp_rows_cpu on the same stored logits widened to double (the ground truth)
//   cpu32  fusedrl::logp_rows_cpu in the chunk's own dtype (the same-precision baseline, reported beside the GPU)
//   gpu    fusedrl::logp_rows_cuda; its stat outputs are NaN-poisoned before the launch and padding columns and a
//          guard after the chunk hold NaN, so an unwritten output or a stray read or write fails.
// Every output element (logp, lse, entropy, each rewritten chunk element; the chunk bit-for-bit in kStats) is
// compared with ref64 under a tolerance derived from the dtype and the shape (see ErrorModel below).
// Timing: CUDA events around the launch alone; before each repeat the chunk is restored from a pristine copy
// (the gradient modes rewrite it) and a buffer larger than L2 is written, so every repeat starts with a cold L2.
// GB/s counts the bytes this design moves (kDirection reads the row twice); "x floor" is the time over the
// minimum traffic (read the chunk once, write it once when a gradient is produced) at peak DRAM bandwidth.
//
// Build (from the repository root; needs nvcc, no torch):
//   pip install --no-build-isolation -C cmake.define.FUSEDRL_BUILD_BENCH=ON .   -> build/<wheel tag>/bench/cpp/
//   nvcc -std=c++17 -O3 --use_fast_math -DFUSEDRL_WITH_CUDA -gencode=arch=compute_90a,code=sm_90a
//        -Icsrc/kernels bench/cpp/bench_logp_rows.cu csrc/kernels/logp_rows.cu csrc/kernels/logp_rows_cpu.cpp
//        -o bench_logp_rows                        (one command line)
// Run:
//   ./bench_logp_rows                                  # all vocab sizes, bf16 + fp32, all three modes
//   ./bench_logp_rows --vocab 151936 --dtype bf16 --mode direction --repeats 50 --json out.json
//   ./bench_logp_rows --cpu-only --rows 64             # no GPU: checks the cpu32 reference against ref64
//   ./bench_logp_rows --help
// Exit status: 0 when every validation passed, 1 when any failed, 2 on bad arguments or a CUDA error.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cerrno>
#include <cfloat>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <string>
#include <thread>
#include <vector>

#include "half_cpu.h"
#include "logp_rows.h"

using fusedrl::LogpRowsParams;
using fusedrl::RowMode;
using fusedrl::ScalarKind;

#define CUDA_CHECK(call)                                                                                     \
  do {                                                                                                       \
    const cudaError_t err_ = (call);                                                                         \
    if (err_ != cudaSuccess) {                                                                               \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(err_), __FILE__, __LINE__,      \
                   cudaGetErrorString(err_));                                                                \
      std::exit(2);                                                                                          \
    }                                                                                                        \
  } while (0)

namespace {

// -----------------------------------------------------------------------------------------------------------------
// options

struct Options {
  int64_t rows = 1024;
  std::vector<int64_t> vocabs = {151936, 128256, 50257};
  std::vector<std::string> dtypes = {"bf16", "fp32"};
  std::vector<RowMode> modes = {RowMode::kStats, RowMode::kDirection, RowMode::kScaledGrad};
  int warmup = 3;
  int repeats = 20;
  double peak_gbps = 0.0;  // 0: from the device attributes
  double temperature = 1.0;
  double softcap = 0.0;
  uint64_t seed = 1234;
  int threads = 0;  // 0: std::thread::hardware_concurrency()
  bool cpu_only = false;
  std::string json_path;
};

const char* mode_name(RowMode m) {
  switch (m) {
    case RowMode::kStats: return "stats";
    case RowMode::kDirection: return "direction";
    case RowMode::kScaledGrad: return "scaled_grad";
  }
  return "?";
}

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  size_t begin = 0;
  while (begin <= s.size()) {
    const size_t end = std::min(s.find(',', begin), s.size());
    if (end > begin) out.push_back(s.substr(begin, end - begin));
    begin = end + 1;
  }
  return out;
}

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "bench_logp_rows: %s (see --help)\n", msg.c_str());
  std::exit(2);
}

int64_t parse_int(const std::string& flag, const std::string& v, int64_t min_value) {
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || x < min_value)
    usage_error(flag + " expects an integer >= " + std::to_string(min_value) + ", got '" + v + "'");
  return x;
}

double parse_double(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || !std::isfinite(x)) usage_error(flag + " expects a number, got '" + v + "'");
  return x;
}

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      std::printf(
          "bench_logp_rows [--rows N] [--vocab V,V,...] [--dtype bf16,fp32] [--mode stats,direction,scaled_grad]\n"
          "                [--warmup N] [--repeats N] [--peak-gbps GB/s] [--temperature T] [--softcap C]\n"
          "                [--seed S] [--threads N] [--cpu-only] [--json PATH]\n"
          "Validates fusedrl::logp_rows_cuda against fusedrl::logp_rows_cpu (float64 ground truth) on every output\n"
          "element, then times it with L2 flushed between repeats. Defaults: rows 1024, vocab 151936,128256,50257\n"
          "(50257 also with ld padded to 16 bytes), bf16+fp32, all modes, 3 warmup + 20 timed repeats.\n");
      std::exit(0);
    } else if (a == "--rows") {
      o.rows = parse_int(a, value(), 1);
    } else if (a == "--vocab") {
      o.vocabs.clear();
      for (const auto& s : split_commas(value())) o.vocabs.push_back(parse_int("--vocab", s, 1));
      if (o.vocabs.empty()) usage_error("--vocab expects a comma-separated list of sizes");
    } else if (a == "--dtype") {
      o.dtypes = split_commas(value());
      for (const auto& d : o.dtypes)
        if (d != "bf16" && d != "fp32") usage_error("--dtype expects bf16 and/or fp32, got '" + d + "'");
      if (o.dtypes.empty()) usage_error("--dtype expects bf16 and/or fp32");
    } else if (a == "--mode") {
      o.modes.clear();
      for (const auto& m : split_commas(value())) {
        if (m == "stats") o.modes.push_back(RowMode::kStats);
        else if (m == "direction") o.modes.push_back(RowMode::kDirection);
        else if (m == "scaled_grad") o.modes.push_back(RowMode::kScaledGrad);
        else usage_error("--mode expects stats, direction and/or scaled_grad, got '" + m + "'");
      }
      if (o.modes.empty()) usage_error("--mode expects stats, direction and/or scaled_grad");
    } else if (a == "--warmup") {
      o.warmup = static_cast<int>(parse_int(a, value(), 0));
    } else if (a == "--repeats") {
      o.repeats = static_cast<int>(parse_int(a, value(), 1));
    } else if (a == "--peak-gbps") {
      o.peak_gbps = parse_double(a, value());
      if (o.peak_gbps <= 0) usage_error("--peak-gbps expects a positive bandwidth in GB/s (H100 SXM: 3350)");
    } else if (a == "--temperature") {
      o.temperature = parse_double(a, value());
      if (o.temperature <= 0) usage_error("--temperature expects a positive number");
    } else if (a == "--softcap") {
      o.softcap = parse_double(a, value());
    } else if (a == "--seed") {
      o.seed = static_cast<uint64_t>(parse_int(a, value(), 0));
    } else if (a == "--threads") {
      o.threads = static_cast<int>(parse_int(a, value(), 1));
    } else if (a == "--cpu-only") {
      o.cpu_only = true;
    } else if (a == "--json") {
      o.json_path = value();
    } else {
      usage_error("unknown argument '" + a + "'");
    }
  }
  if (o.threads == 0) o.threads = std::max(1u, std::thread::hardware_concurrency());
  return o;
}

// -----------------------------------------------------------------------------------------------------------------
// host helpers: storage types, random numbers, a parallel loop

template <typename HostT> struct Storage;
template <> struct Storage<uint16_t> {  // bf16 as raw bits on the host, __nv_bfloat16 on the device
  using Device = __nv_bfloat16;
  static constexpr ScalarKind kind = ScalarKind::kBFloat16;
  static constexpr const char* name = "bf16";
  static constexpr double unit_roundoff = 0x1p-8;  // 8 significand bits
  static double to_double(uint16_t b) { return fusedrl::bf16_to_float(b); }
  static uint16_t from_float(float f) { return fusedrl::float_to_bf16(f); }
  static uint16_t poison() { return 0xffff; }  // a NaN
};
template <> struct Storage<float> {
  using Device = float;
  static constexpr ScalarKind kind = ScalarKind::kFloat32;
  static constexpr const char* name = "fp32";
  static constexpr double unit_roundoff = 0x1p-24;
  static double to_double(float f) { return f; }
  static float from_float(float f) { return f; }
  static float poison() { return fusedrl::bits_to_float(0xffffffffu); }  // a NaN
};
static_assert(sizeof(Storage<uint16_t>::Device) == sizeof(uint16_t), "bf16 host bits and device type differ");

template <typename HostT>
bool same_bits(HostT a, HostT b) {
  return std::memcmp(&a, &b, sizeof a) == 0;
}

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
double uniform01(uint64_t& state) { return (splitmix64(state) >> 11) * 0x1p-53; }  // [0, 1)
double normal(uint64_t& state) {
  const double u1 = 1.0 - uniform01(state), u2 = uniform01(state);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

// Calls fn(begin, end) on `threads` threads over [0, n).
void parallel_for(int64_t n, int threads, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, n));
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < parts; ++t) {
    const int64_t begin = n * t / parts, end = n * (t + 1) / parts;
    pool.emplace_back(fn, begin, end);
  }
  for (auto& th : pool) th.join();
}

// -----------------------------------------------------------------------------------------------------------------
// inputs: awkward rows by default

constexpr int64_t kGuard = 256;  // NaN elements after the last row: a write past the chunk changes them

// Row kinds cycle with row % 8: 0-3 normal logits of spread 1, 2, 4, 0.5; 4 peaked at the target (+30);
// 5 peaked at another column (+30; every other such row in the last 7 columns, where vector tails live);
// 6 constant (uniform softmax, entropy = log V); 7 normal shifted by +80 (large lse, cancellation in logp).
// Targets are uniform, except a few rows that aim at the first or the last column.
template <typename HostT>
void fill_inputs(const Options& o, int64_t vocab, int64_t ld, std::vector<HostT>& raw, std::vector<int64_t>& targets,
                 std::vector<float>& row_scale) {
  const int64_t rows = o.rows;
  raw.assign(rows * ld + kGuard, Storage<HostT>::poison());
  targets.resize(rows);
  row_scale.resize(rows);
  parallel_for(rows, o.threads, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      uint64_t state = o.seed * 0x2545f4914f6cdd1dull + static_cast<uint64_t>(r) * 0x9e3779b97f4a7c15ull +
                       static_cast<uint64_t>(vocab);
      int64_t target = static_cast<int64_t>(splitmix64(state) % static_cast<uint64_t>(vocab));
      if (r % 97 == 1) target = 0;
      if (r % 97 == 2) target = vocab - 1;
      targets[r] = target;
      row_scale[r] = r % 11 == 0 ? 0.0f : static_cast<float>(6.0 * uniform01(state) - 3.0);
      const int kind = static_cast<int>(r % 8);
      static const double kSpread[4] = {1.0, 2.0, 4.0, 0.5};
      HostT* row = raw.data() + r * ld;
      for (int64_t v = 0; v < vocab; ++v) {
        double x;
        switch (kind) {
          case 6: x = 1.5; break;
          case 7: x = 80.0 + 3.0 * normal(state); break;
          default: x = (kind < 4 ? kSpread[kind] : 2.0) * normal(state); break;
        }
        row[v] = Storage<HostT>::from_float(static_cast<float>(x));
      }
      if (kind == 4) row[target] = Storage<HostT>::from_float(static_cast<float>(Storage<HostT>::to_double(row[target]) + 30.0));
      if (kind == 5) {
        int64_t peak = (r / 8) % 2 ? vocab - 1 - (r % 7) : static_cast<int64_t>(splitmix64(state) % vocab);
        if (peak == target) peak = (peak + 1) % vocab;
        row[peak] = Storage<HostT>::from_float(static_cast<float>(Storage<HostT>::to_double(row[peak]) + 30.0));
      }
    }
  });
}

// -----------------------------------------------------------------------------------------------------------------
// reference runs on the CPU

struct RowOutputs {  // (rows) each; the accumulation type of the run that filled them
  std::vector<float> logp, lse, entropy;
  std::vector<double> logp64, lse64, entropy64;
};

LogpRowsParams make_params(void* chunk, ScalarKind kind, RowMode mode, int64_t rows, int64_t vocab, int64_t ld,
                           const int64_t* targets, const Options& o) {
  LogpRowsParams p;
  p.logits = chunk;
  p.ld = ld;
  p.targets = targets;
  p.rows = rows;
  p.vocab = vocab;
  p.kind = kind;
  p.mode = mode;
  p.inv_temperature = 1.0 / o.temperature;
  p.softcap = o.softcap;
  return p;
}

void run_cpu(const LogpRowsParams& p, int threads) {
  parallel_for(p.rows, threads, [&](int64_t begin, int64_t end) { fusedrl::logp_rows_cpu(p, begin, end); });
}

// -----------------------------------------------------------------------------------------------------------------
// validation against ref64

// ErrorModel: first-order bounds, doubled, for an implementation that accumulates in float (unit roundoff
// u = 2^-24) and stores the chunk in a dtype of unit roundoff u_out (bf16 2^-8, fp32 2^-24):
//  * s = sum exp(z - m) is a sum of positive terms: a thread adds n_seq of them in sequence (GPU: ceil(V / 512);
//    a sequential CPU loop: V) and a tree of `levels` combines follows (GPU: 5 shuffle + 5 warp levels); each step
//    costs about 4u (add, exp rounding, rescale), so relerr(s) <= (4 n_seq + 4 levels) u.
//  * __expf(d) is off by about (2 + 1.16 |d|) ulp: weighted by softmax this is <= (2 + 1.2 R) u with R the
//    row's range of z; __logf and constants: 16 + 4 ln V. z = x exactly without temperature or softcap; with
//    them z = cap tanh(x / cap) * float(1 / T) is off by c_z u |z|, c_z = 6 (tanh 2 ulp, 3 roundings, 1 / T).
//  => gamma(row) = 2 u (4 n_seq + 4 levels + 16 + 4 ln V + 1.2 R + c_z |z|max + 1.2 H), and
//     lse:     gamma + 4u |lse|                     (log s inherits relerr(s); the final add rounds)
//     logp:    tol(lse) + (4 + c_z) u |z_t| + 4u |logp|
//     entropy: gamma (1 + 2H) + 4u (1 + H)          (H = log s - t/s with |t/s| <= H, t a same-sign sum)
//     grad g = scale (onehot - p) dz:  u_out |g| + (1 + u_out) (|scale dz| err(p) + 4u |g|) + 4 FLT_MIN |scale dz|
//       with err(p) = p (tol(lse) + 2 (4 + 2.2 |z - lse| + c_z |z|) u): rounding z - lse (u |d|) and __expf(d)
//       (2 + 1.173 |d| ulp), doubled; tol(lse) = 0 in kScaledGrad, where lse is an input;
//       u_out |g| is the final rounding to the storage dtype, FLT_MIN covers flush-to-zero of tiny probabilities;
//       with a softcap dz = (1 - th^2) / T cancels: relerr(dz) = 2 (4 + 4 th^2 / (1 - th^2)) u adds |g| relerr(dz).
// Worst-case bounds sit far above typical errors (~sqrt(n) u), yet a wrong element, row, target, missing term or
// missed write lands orders of magnitude above them (and NaN never passes).
struct ErrorModel {
  double u = 0x1p-24;
  double u_out = 0x1p-24;
  int64_t n_seq = 1;
  int levels = 0;
};

struct Check {
  double worst_ratio = 0.0;  // max err / tol over every compared element
  int64_t failures = 0;
  int64_t compared = 0;
  double lse_err = 0.0;  // max |lse - lse64|, the headline accuracy number
  std::string first_failure;
  void add(double got, double want, double tol, const char* what, int64_t row, int64_t col) {
    ++compared;
    const double err = std::fabs(got - want);
    const double ratio = err <= tol ? (tol > 0 ? err / tol : 0.0) : (std::isnan(err) ? INFINITY : err / tol);
    worst_ratio = std::max(worst_ratio, ratio);
    if (!(err <= tol)) fail(what, row, col, got, want, tol);
  }
  void fail(const char* what, int64_t row, int64_t col, double got, double want, double tol) {
    if (failures++ == 0) {
      char buf[256];
      std::snprintf(buf, sizeof buf, "%s row %" PRId64 " col %" PRId64 ": got %.9g want %.9g tol %.3g", what, row,
                    col, got, want, tol);
      first_failure = buf;
    }
    worst_ratio = INFINITY;
  }
  void merge(const Check& c) {
    worst_ratio = std::max(worst_ratio, c.worst_ratio);
    if (failures == 0 && c.failures > 0) first_failure = c.first_failure;
    failures += c.failures;
    compared += c.compared;
    lse_err = std::max(lse_err, c.lse_err);
  }
};

// The reference results of one (vocab, ld, dtype, mode).
template <typename HostT>
struct Reference {
  const std::vector<HostT>* raw = nullptr;  // the inputs (rows * ld + kGuard)
  const std::vector<int64_t>* targets = nullptr;
  const std::vector<float>* row_scale = nullptr;
  const std::vector<float>* lse_in = nullptr;
  const std::vector<double>* chunk64 = nullptr;  // ref64's rewritten chunk (kDirection / kScaledGrad)
  const RowOutputs* stats = nullptr;             // ref64's logp64 / lse64 / entropy64
};

// Compares one implementation's outputs (stats: null in kScaledGrad) with ref64.
template <typename HostT>
Check validate(const Options& o, int64_t vocab, int64_t ld, RowMode mode, const Reference<HostT>& ref,
               const ErrorModel& em, const std::vector<HostT>& chunk, const RowOutputs* stats) {
  const double u = em.u;
  const double inv_t = 1.0 / o.temperature;
  const bool capped = o.softcap > 0;
  const double c_z = capped || o.temperature != 1.0 ? 6.0 : 0.0;
  auto final_z = [&](double x) { return (capped ? o.softcap * std::tanh(x / o.softcap) : x) * inv_t; };
  auto dz_draw = [&](double x) {
    if (!capped) return inv_t;
    const double th = std::tanh(x / o.softcap);
    return (1.0 - th * th) * inv_t;
  };
  std::vector<Check> per_thread(o.threads);
  std::vector<std::thread> pool;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(o.threads, o.rows));
  for (int64_t t = 0; t < parts; ++t) {
    pool.emplace_back([&, t]() {
      Check& c = per_thread[t];
      for (int64_t r = o.rows * t / parts; r < o.rows * (t + 1) / parts; ++r) {
        const HostT* in = ref.raw->data() + r * ld;
        const HostT* out = chunk.data() + r * ld;
        const int64_t target = (*ref.targets)[r];
        double z_min = INFINITY, z_max = -INFINITY, z_abs = 0;
        for (int64_t v = 0; v < vocab; ++v) {
          const double z = final_z(Storage<HostT>::to_double(in[v]));
          z_min = std::min(z_min, z);
          z_max = std::max(z_max, z);
          z_abs = std::max(z_abs, std::fabs(z));
        }
        const double lse_ref = mode == RowMode::kScaledGrad ? static_cast<double>((*ref.lse_in)[r])
                                                            : ref.stats->lse64[r];
        const double h_ref = mode == RowMode::kScaledGrad ? std::log(static_cast<double>(vocab))
                                                          : ref.stats->entropy64[r];
        const double gamma = 2 * u *
                             (4.0 * em.n_seq + 4.0 * em.levels + 16 + 4 * std::log(static_cast<double>(vocab)) +
                              1.2 * (z_max - z_min) + c_z * z_abs + 1.2 * std::fabs(h_ref));
        const double tol_lse = gamma + 4 * u * std::fabs(lse_ref);
        if (mode != RowMode::kScaledGrad) {
          const double z_t = final_z(Storage<HostT>::to_double(in[target]));
          const double logp_ref = ref.stats->logp64[r];
          c.add(stats->logp[r], logp_ref, tol_lse + (4 + c_z) * u * std::fabs(z_t) + 4 * u * std::fabs(logp_ref), "logp", r, -1);
          c.add(stats->lse[r], lse_ref, tol_lse, "lse", r, -1);
          c.lse_err = std::max(c.lse_err, std::fabs(stats->lse[r] - lse_ref));
          c.add(stats->entropy[r], h_ref, gamma * (1 + 2 * h_ref) + 4 * u * (1 + h_ref), "entropy", r, -1);
        }
        // columns past vocab (padding) must be untouched in every mode
        for (int64_t v = vocab; v < ld; ++v)
          if (!same_bits(out[v], in[v])) c.fail("padding column changed", r, v, Storage<HostT>::to_double(out[v]), NAN, 0);
        if (mode == RowMode::kStats) {
          for (int64_t v = 0; v < vocab; ++v)
            if (!same_bits(out[v], in[v]))
              c.fail("kStats changed the chunk", r, v, Storage<HostT>::to_double(out[v]), Storage<HostT>::to_double(in[v]), 0);
          c.compared += vocab;
          continue;
        }
        const double scale = mode == RowMode::kScaledGrad ? (*ref.row_scale)[r] : 1.0;
        const double err_lse = mode == RowMode::kScaledGrad ? 0.0 : tol_lse;
        const double* g_ref = ref.chunk64->data() + r * ld;
        for (int64_t v = 0; v < vocab; ++v) {
          const double x = Storage<HostT>::to_double(in[v]);
          const double z = final_z(x);
          const double p = std::exp(z - lse_ref);
          const double sdz = std::fabs(scale * dz_draw(x));
          const double err_p = p * (err_lse + 2 * (4 + 2.2 * std::fabs(z - lse_ref) + c_z * std::fabs(z)) * u);
          const double g = std::fabs(g_ref[v]);
          double rel_dz = 0;
          if (capped) {
            const double th = std::tanh(x / o.softcap);
            rel_dz = 2 * (4 + 4 * th * th / std::max(1e-300, 1 - th * th)) * u;
          }
          const double tol =
              em.u_out * g + (1 + em.u_out) * (sdz * err_p + (4 * u + rel_dz) * g) + 4 * FLT_MIN * sdz;
          c.add(Storage<HostT>::to_double(out[v]), g_ref[v], tol, "grad", r, v);
        }
      }
    });
  }
  for (auto& th : pool) th.join();
  Check total;
  for (const auto& c : per_thread) total.merge(c);
  const size_t tail = static_cast<size_t>(o.rows * ld);
  for (int64_t i = 0; i < kGuard; ++i)
    if (!same_bits(chunk[tail + i], (*ref.raw)[tail + i])) total.fail("guard after the chunk changed", o.rows, i, 0, NAN, 0);
  return total;
}

// -----------------------------------------------------------------------------------------------------------------
// device: properties, timing

struct Device {
  std::string name = "cpu only";
  double peak_gbps = 0;
  int64_t l2_bytes = 0;
  int64_t flush_bytes = 0;
  void* flush = nullptr;
};

Device open_device(const Options& o) {
  Device d;
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  int mem_clock_khz = 0;  // cudaDeviceProp::memoryClockRate is gone in CUDA 13; the attribute remains
  CUDA_CHECK(cudaDeviceGetAttribute(&mem_clock_khz, cudaDevAttrMemoryClockRate, dev));
  d.name = prop.name;
  d.l2_bytes = prop.l2CacheSize;
  // double data rate: 2 transfers per clock, busWidth bits each (H100 SXM: 2 * 2.619 GHz * 640 B = 3.35 TB/s)
  const double derived = 2.0 * mem_clock_khz * 1e3 * (prop.memoryBusWidth / 8.0) / 1e9;
  d.peak_gbps = o.peak_gbps > 0 ? o.peak_gbps : derived;
  if (d.peak_gbps <= 0) usage_error("the device reports no memory clock: pass --peak-gbps (H100 SXM 3350, H200 4800)");
  d.flush_bytes = std::max<int64_t>(int64_t(256) << 20, 4 * d.l2_bytes);
  CUDA_CHECK(cudaMalloc(&d.flush, d.flush_bytes));
  return d;
}

struct Timing {
  double ms_median = NAN, ms_min = NAN;
};

// Restores the chunk, flushes L2, times one launch; `repeats` times after `warmup` untimed runs.
Timing time_kernel(const Options& o, const Device& dev, const LogpRowsParams& p, const void* pristine,
                   size_t chunk_bytes) {
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> ms;
  for (int i = 0; i < o.warmup + o.repeats; ++i) {
    CUDA_CHECK(cudaMemcpyAsync(p.logits, pristine, chunk_bytes, cudaMemcpyDeviceToDevice, 0));
    CUDA_CHECK(cudaMemsetAsync(dev.flush, i & 0xff, dev.flush_bytes, 0));
    CUDA_CHECK(cudaEventRecord(start, 0));
    CUDA_CHECK(fusedrl::logp_rows_cuda(p, 0));
    CUDA_CHECK(cudaEventRecord(stop, 0));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float elapsed = 0;
    CUDA_CHECK(cudaEventElapsedTime(&elapsed, start, stop));
    if (i >= o.warmup) ms.push_back(elapsed);
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  return {ms[ms.size() / 2], ms.front()};
}

// -----------------------------------------------------------------------------------------------------------------
// one configuration: (vocab, ld, dtype) with every requested mode

struct Result {
  int64_t vocab = 0, ld = 0;
  std::string dtype, mode;
  Timing t;
  double bytes = 0, min_bytes = 0;  // moved by this design / the least any implementation must move
  Check gpu, cpu;
};

template <typename HostT>
void run_config(const Options& o, Device* dev, int64_t vocab, int64_t ld, std::vector<Result>& results) {
  using S = Storage<HostT>;
  const int64_t rows = o.rows;
  std::vector<HostT> raw;
  std::vector<int64_t> targets;
  std::vector<float> row_scale;
  fill_inputs(o, vocab, ld, raw, targets, row_scale);

  // ref64: kDirection gives the stats and the direction; kScaledGrad runs with lse_in = float(lse64).
  RowOutputs ref_stats;
  ref_stats.logp64.resize(rows);
  ref_stats.lse64.resize(rows);
  ref_stats.entropy64.resize(rows);
  std::vector<double> dir64(raw.size()), scaled64;
  auto widen = [&](std::vector<double>& dst) {
    dst.resize(raw.size());
    parallel_for(static_cast<int64_t>(raw.size()), o.threads, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) dst[i] = S::to_double(raw[i]);
    });
  };
  widen(dir64);
  LogpRowsParams p64 = make_params(dir64.data(), ScalarKind::kFloat64, RowMode::kDirection, rows, vocab, ld,
                                   targets.data(), o);
  p64.logp = ref_stats.logp64.data();
  p64.lse = ref_stats.lse64.data();
  p64.entropy = ref_stats.entropy64.data();
  run_cpu(p64, o.threads);
  std::vector<float> lse_in(rows);
  std::vector<double> lse_in64(rows), row_scale64(rows);
  for (int64_t r = 0; r < rows; ++r) {
    lse_in[r] = static_cast<float>(ref_stats.lse64[r]);
    lse_in64[r] = lse_in[r];
    row_scale64[r] = row_scale[r];
  }
  const bool want_scaled = std::find(o.modes.begin(), o.modes.end(), RowMode::kScaledGrad) != o.modes.end();
  if (want_scaled) {
    widen(scaled64);
    LogpRowsParams ps = make_params(scaled64.data(), ScalarKind::kFloat64, RowMode::kScaledGrad, rows, vocab, ld,
                                    targets.data(), o);
    ps.lse_in = lse_in64.data();
    ps.row_scale = row_scale64.data();
    run_cpu(ps, o.threads);
  }

  // device buffers: pristine inputs, the working chunk, the small arrays
  const size_t chunk_bytes = raw.size() * sizeof(HostT);
  typename S::Device *d_pristine = nullptr, *d_chunk = nullptr;
  int64_t* d_targets = nullptr;
  float *d_logp = nullptr, *d_lse = nullptr, *d_entropy = nullptr, *d_lse_in = nullptr, *d_scale = nullptr;
  if (!o.cpu_only) {
    CUDA_CHECK(cudaMalloc(&d_pristine, chunk_bytes));
    CUDA_CHECK(cudaMalloc(&d_chunk, chunk_bytes));
    CUDA_CHECK(cudaMalloc(&d_targets, rows * sizeof(int64_t)));
    for (float** ptr : {&d_logp, &d_lse, &d_entropy, &d_lse_in, &d_scale})
      CUDA_CHECK(cudaMalloc(ptr, rows * sizeof(float)));
    CUDA_CHECK(cudaMemcpy(d_pristine, raw.data(), chunk_bytes, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(d_targets, targets.data(), rows * sizeof(int64_t), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(d_lse_in, lse_in.data(), rows * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(d_scale, row_scale.data(), rows * sizeof(float), cudaMemcpyHostToDevice));
  }

  std::vector<HostT> work;
  for (RowMode mode : o.modes) {
    Result res;
    res.vocab = vocab;
    res.ld = ld;
    res.dtype = S::name;
    res.mode = mode_name(mode);
    Reference<HostT> ref;
    ref.raw = &raw;
    ref.targets = &targets;
    ref.row_scale = &row_scale;
    ref.lse_in = &lse_in;
    ref.chunk64 = mode == RowMode::kScaledGrad ? &scaled64 : &dir64;
    ref.stats = &ref_stats;
    RowOutputs out;
    out.logp.assign(rows, NAN);
    out.lse.assign(rows, NAN);
    out.entropy.assign(rows, NAN);

    // cpu32: the same CPU code in the chunk's dtype, validated under the model of a sequential float sum
    work = raw;
    LogpRowsParams pc = make_params(work.data(), S::kind, mode, rows, vocab, ld, targets.data(), o);
    pc.logp = out.logp.data();
    pc.lse = out.lse.data();
    pc.entropy = out.entropy.data();
    pc.lse_in = lse_in.data();
    pc.row_scale = row_scale.data();
    run_cpu(pc, o.threads);
    res.cpu = validate(o, vocab, ld, mode, ref, ErrorModel{0x1p-24, S::unit_roundoff, vocab, 0}, work,
                       mode == RowMode::kScaledGrad ? nullptr : &out);

    if (!o.cpu_only) {
      // gpu: poison the outputs, run once, validate every element, then time
      LogpRowsParams pg = make_params(d_chunk, S::kind, mode, rows, vocab, ld, d_targets, o);
      pg.logp = d_logp;
      pg.lse = d_lse;
      pg.entropy = d_entropy;
      pg.lse_in = d_lse_in;
      pg.row_scale = d_scale;
      CUDA_CHECK(cudaMemcpy(d_chunk, d_pristine, chunk_bytes, cudaMemcpyDeviceToDevice));
      for (float* ptr : {d_logp, d_lse, d_entropy}) CUDA_CHECK(cudaMemset(ptr, 0xff, rows * sizeof(float)));
      CUDA_CHECK(fusedrl::logp_rows_cuda(pg, 0));
      CUDA_CHECK(cudaDeviceSynchronize());
      CUDA_CHECK(cudaMemcpy(work.data(), d_chunk, chunk_bytes, cudaMemcpyDeviceToHost));
      CUDA_CHECK(cudaMemcpy(out.logp.data(), d_logp, rows * sizeof(float), cudaMemcpyDeviceToHost));
      CUDA_CHECK(cudaMemcpy(out.lse.data(), d_lse, rows * sizeof(float), cudaMemcpyDeviceToHost));
      CUDA_CHECK(cudaMemcpy(out.entropy.data(), d_entropy, rows * sizeof(float), cudaMemcpyDeviceToHost));
      const int64_t n_seq = (vocab + 511) / 512 + 1;  // one block of 512 threads per row
      res.gpu = validate(o, vocab, ld, mode, ref, ErrorModel{0x1p-24, S::unit_roundoff, n_seq, 10}, work,
                         mode == RowMode::kScaledGrad ? nullptr : &out);
      res.t = time_kernel(o, *dev, pg, d_pristine, chunk_bytes);
    }
    // traffic: the chunk (vocab columns of each row) plus the per-row arrays
    const double row_bytes = static_cast<double>(rows) * vocab * sizeof(HostT);
    const double small = rows * (sizeof(int64_t) + 3.0 * sizeof(float));
    const int reads = mode == RowMode::kDirection ? 2 : 1, writes = mode == RowMode::kStats ? 0 : 1;
    res.bytes = (reads + writes) * row_bytes + small;
    res.min_bytes = (1 + writes) * row_bytes + small;
    results.push_back(res);
    std::fflush(stdout);
  }
  if (!o.cpu_only) {
    for (void* ptr : std::initializer_list<void*>{d_pristine, d_chunk, d_targets, d_logp, d_lse, d_entropy,
                                                 d_lse_in, d_scale})
      CUDA_CHECK(cudaFree(ptr));
  }
}

// -----------------------------------------------------------------------------------------------------------------
// report

void write_json(const Options& o, const Device& dev, const std::vector<Result>& results) {
  FILE* f = std::fopen(o.json_path.c_str(), "w");
  if (!f) {
    std::fprintf(stderr, "bench_logp_rows: cannot write --json %s: %s\n", o.json_path.c_str(), std::strerror(errno));
    std::exit(2);
  }
  auto num = [](double x) { return std::isfinite(x) ? std::to_string(x) : std::string("null"); };
  std::fprintf(f, "{\n  \"meta\": {\"device\": \"%s\", \"peak_gbps\": %s, \"l2_bytes\": %" PRId64
                  ", \"flush_bytes\": %" PRId64 ", \"rows\": %" PRId64 ", \"warmup\": %d, \"repeats\": %d, "
                  "\"temperature\": %s, \"softcap\": %s, \"seed\": %" PRIu64 ", \"cpu_only\": %s},\n  \"rows\": [\n",
               dev.name.c_str(), num(dev.peak_gbps).c_str(), dev.l2_bytes, dev.flush_bytes, o.rows, o.warmup,
               o.repeats, num(o.temperature).c_str(), num(o.softcap).c_str(), o.seed, o.cpu_only ? "true" : "false");
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    const double gbps = r.bytes / (r.t.ms_median * 1e-3) / 1e9;
    const double floor_ms = r.min_bytes / (dev.peak_gbps * 1e9) * 1e3;
    std::fprintf(f,
                 "    {\"vocab\": %" PRId64 ", \"ld\": %" PRId64 ", \"dtype\": \"%s\", \"mode\": \"%s\", "
                 "\"ms_median\": %s, \"ms_min\": %s, \"bytes\": %.0f, \"min_bytes\": %.0f, \"gbps\": %s, "
                 "\"pct_peak\": %s, \"floor_x\": %s, \"gpu_worst_err_over_tol\": %s, \"gpu_failures\": %" PRId64
                 ", \"cpu32_worst_err_over_tol\": %s, \"cpu32_failures\": %" PRId64
                 ", \"gpu_max_lse_err\": %s, \"cpu32_max_lse_err\": %s, \"first_failure\": \"%s\"}%s\n",
                 r.vocab, r.ld, r.dtype.c_str(), r.mode.c_str(), num(r.t.ms_median).c_str(), num(r.t.ms_min).c_str(),
                 r.bytes, r.min_bytes, num(gbps).c_str(), num(100 * gbps / dev.peak_gbps).c_str(),
                 num(r.t.ms_median / floor_ms).c_str(), num(r.gpu.worst_ratio).c_str(), r.gpu.failures,
                 num(r.cpu.worst_ratio).c_str(), r.cpu.failures, num(r.gpu.lse_err).c_str(), num(r.cpu.lse_err).c_str(),
                 (r.gpu.failures ? r.gpu.first_failure : r.cpu.first_failure).c_str(),
                 i + 1 < results.size() ? "," : "");
  }
  std::fprintf(f, "  ]\n}\n");
  std::fclose(f);
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse_args(argc, argv);
  Device dev;
  if (!o.cpu_only) dev = open_device(o);
  std::printf("bench_logp_rows: %s | peak DRAM %.0f GB/s | L2 %.0f MiB, flush %.0f MiB | rows %" PRId64
              " | temperature %g softcap %g | %d threads for the CPU reference\n",
              dev.name.c_str(), dev.peak_gbps, dev.l2_bytes / 1048576.0, dev.flush_bytes / 1048576.0, o.rows,
              o.temperature, o.softcap, o.threads);

  std::vector<Result> results;
  for (int64_t vocab : o.vocabs) {
    // ld = vocab (as a contiguous torch chunk), and for odd rows also ld padded to 16 bytes (vector path + tail)
    for (const std::string& dtype : o.dtypes) {
      const int64_t per16 = dtype == "bf16" ? 8 : 4;
      std::vector<int64_t> lds = {vocab};
      if (vocab % per16) lds.push_back((vocab + per16 - 1) / per16 * per16);
      for (int64_t ld : lds) {
        if (dtype == "bf16") run_config<uint16_t>(o, &dev, vocab, ld, results);
        else run_config<float>(o, &dev, vocab, ld, results);
      }
    }
  }

  std::printf("\n%7s %7s %5s %-11s %9s %8s %6s %7s %10s %10s %9s %9s  %s\n", "vocab", "ld", "dtype", "mode", "ms",
              "GB/s", "%peak", "x floor", "gpu e/tol", "cpu32 e/tol", "gpu dlse", "cpu32 dlse", "status");
  int failed = 0;
  for (const Result& r : results) {
    const bool ok = r.gpu.failures == 0 && r.cpu.failures == 0;
    failed += !ok;
    const double gbps = r.bytes / (r.t.ms_median * 1e-3) / 1e9;
    const double floor_ms = r.min_bytes / (dev.peak_gbps * 1e9) * 1e3;
    char timing[96] = "        -        -      -       -";
    if (!o.cpu_only)
      std::snprintf(timing, sizeof timing, "%9.4f %8.0f %5.1f%% %7.2f", r.t.ms_median, gbps, 100 * gbps / dev.peak_gbps,
                    r.t.ms_median / floor_ms);
    char gpu_cell[32] = "-";
    if (!o.cpu_only) std::snprintf(gpu_cell, sizeof gpu_cell, "%.3g", r.gpu.worst_ratio);
    std::string status = ok ? "ok" : "FAIL " + std::to_string(r.gpu.failures) + " gpu / " +
                                         std::to_string(r.cpu.failures) + " cpu32: " +
                                         (r.gpu.failures ? r.gpu.first_failure : r.cpu.first_failure);
    const bool has_lse = r.mode != "scaled_grad";
    char dlse[2][32] = {"-", "-"};
    if (has_lse && !o.cpu_only) std::snprintf(dlse[0], sizeof dlse[0], "%.2e", r.gpu.lse_err);
    if (has_lse) std::snprintf(dlse[1], sizeof dlse[1], "%.2e", r.cpu.lse_err);
    std::printf("%7" PRId64 " %7" PRId64 " %5s %-11s %s %10s %10.3g %9s %9s  %s\n", r.vocab, r.ld, r.dtype.c_str(),
                r.mode.c_str(), timing, gpu_cell, r.cpu.worst_ratio, dlse[0], dlse[1], status.c_str());
  }
  std::printf("\nms: median of %d repeats, L2 flushed before each; GB/s: bytes this kernel moves (kDirection reads "
              "each row twice) / ms; x floor: ms / (least bytes: read once, write once / peak); e/tol: worst "
              "|out - ref64| / tolerance over every output element (<= 1 passes); dlse: max |lse - lse64|.\n",
              o.repeats);
  if (!o.json_path.empty()) write_json(o, dev, results);
  if (failed) std::printf("bench_logp_rows: %d of %zu configurations FAILED validation\n", failed, results.size());
  return failed ? 1 : 0;
}
