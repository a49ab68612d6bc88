// bench_nf4: validates and times the torch-free NF4 kernels (csrc/kernels/nf4.h) on one GPU.
//
// What it measures, per weight shape (N, K) (Llama-3.1-8B projections incl. the fused gate_up (235 MB of bf16
// output), one Qwen3-4B one, odd shapes for the tails and the scalar path):
//   dequant   nf4_dequantize_cuda, packed (N*K/2 bytes) + absmax -> W (N, K) bf16 / fp16 / fp32, plain and nested
//             absmax, blocksize 64 (128 and 256 on one shape), contiguous and padded (ld > K) outputs. GB/s counts
//             bytes read + written; "x copy" = (ms of a cudaMemcpy D2D moving the same bytes: it reads and writes
//             half of them each) / (dequant ms), measured in the same run next to it: the target is >= 0.85.
//   matmul    nf4_matmul_cuda, y (M, N) = x (M, K) @ W^T + lora (M, 16) @ B^T + bias, bf16, M = 1, 8, 16; "x copy"
//             against a D2D copy of the same bytes (the bandwidth of reading the 4-bit weight once). GB/s counts
//             the 4-bit weight and its statistics, x, B and y.
//   lora_down nf4_lora_down_cuda (the small-M LoRA down-projection), against its CPU reference.
// Validation before timing: outputs are poisoned (0xff bytes = NaN) before the launch; dequant is compared
// bit-for-bit with nf4_dequantize_cpu on every element; matmul with a double-precision product over the weight
// rounded to bf16 as the kernels multiply it (the bit-exact CPU dequantization), under
// |gpu - ref| <= 2^-8 |ref| + 2^-18 sum|x w| (bf16 output rounding plus float accumulation in any order).
// Timing: CUDA events around the launch, a buffer larger than L2 written before each
// repeat (cold L2), median of the repeats.
//
// Build: with the package (-C cmake.define.FUSEDRL_BUILD_BENCH=ON, see bench/cpp/CMakeLists.txt) or
//   nvcc -std=c++17 -O3 --use_fast_math -DFUSEDRL_WITH_CUDA -gencode=arch=compute_90a,code=sm_90a -Icsrc/kernels
//        bench/cpp/bench_nf4.cu csrc/kernels/nf4.cu csrc/kernels/nf4_cpu.cpp -o bench_nf4
// Run: ./bench_nf4 [--repeats 20]. Exit status 0 when every validation passed, 1 otherwise, 2 on a CUDA error.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "half_cpu.h"
#include "nf4.h"

#define CUDA_CHECK(call)                                                                                      \
  do {                                                                                                        \
    const cudaError_t err_ = (call);                                                                          \
    if (err_ != cudaSuccess) {                                                                                \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(err_), __FILE__, __LINE__,       \
                   cudaGetErrorString(err_));                                                                 \
      std::exit(2);                                                                                           \
    }                                                                                                         \
  } while (0)

using fusedrl::Nf4DequantParams;
using fusedrl::Nf4Dtype;
using fusedrl::Nf4MatmulParams;
using fusedrl::Nf4Weight;

namespace {

struct Shape {
  const char* name;
  int64_t n, k;
};

template <typename T>
T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  CUDA_CHECK(cudaMalloc(&d, std::max<size_t>(1, h.size() * sizeof(T))));
  CUDA_CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

// A random NF4 weight on host and device (nested or plain statistics).
struct Weight {
  std::vector<uint8_t> packed, absmax_q;
  std::vector<float> absmax, nested_absmax, nested_code;
  Nf4Weight host, device;

  Weight(int64_t n, int64_t k, bool nested, std::mt19937& rng, int64_t blocksize = 64) {
    const int64_t numel = n * k, nblocks = (numel + blocksize - 1) / blocksize;
    std::uniform_int_distribution<int> byte(0, 255);
    std::uniform_real_distribution<float> scale(0.01f, 0.1f), unit(-1.0f, 1.0f);
    packed.resize((numel + 1) / 2);
    for (auto& b : packed) b = static_cast<uint8_t>(byte(rng));
    host.rows = device.rows = n;
    host.cols = device.cols = k;
    host.blocksize = device.blocksize = blocksize;
    host.packed = packed.data();
    device.packed = to_device(packed);
    if (!nested) {
      absmax.resize(nblocks);
      for (auto& a : absmax) a = scale(rng);
      host.absmax = absmax.data();
      device.absmax = to_device(absmax);
      return;
    }
    absmax_q.resize(nblocks);
    for (auto& q : absmax_q) q = static_cast<uint8_t>(byte(rng));
    nested_absmax.resize((nblocks + 255) / 256);
    for (auto& a : nested_absmax) a = scale(rng);
    nested_code.resize(256);
    for (auto& c : nested_code) c = unit(rng);
    std::sort(nested_code.begin(), nested_code.end());
    host.absmax_q = absmax_q.data();
    host.nested_absmax = nested_absmax.data();
    host.nested_code = nested_code.data();
    host.offset = device.offset = 0.05f;
    device.absmax_q = to_device(absmax_q);
    device.nested_absmax = to_device(nested_absmax);
    device.nested_code = to_device(nested_code);
  }
};

struct Timer {
  void* flush = nullptr;
  size_t flush_bytes = 0;
  int repeats = 20;

  Timer() {
    int dev = 0, l2 = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
    flush_bytes = std::max<size_t>(size_t(256) << 20, size_t(4) * l2);
    CUDA_CHECK(cudaMalloc(&flush, flush_bytes));
  }

  // median milliseconds of `repeats` launches, each after an L2 flush
  template <typename F>
  double time(F launch) {
    cudaEvent_t a, b;
    CUDA_CHECK(cudaEventCreate(&a));
    CUDA_CHECK(cudaEventCreate(&b));
    launch();  // warm-up
    std::vector<float> ms;
    for (int i = 0; i < repeats; ++i) {
      CUDA_CHECK(cudaMemsetAsync(flush, i & 0xff, flush_bytes, 0));
      CUDA_CHECK(cudaEventRecord(a, 0));
      launch();
      CUDA_CHECK(cudaEventRecord(b, 0));
      CUDA_CHECK(cudaEventSynchronize(b));
      float t = 0;
      CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
      ms.push_back(t);
    }
    CUDA_CHECK(cudaEventDestroy(a));
    CUDA_CHECK(cudaEventDestroy(b));
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  }
};

size_t element_size(Nf4Dtype d) { return d == Nf4Dtype::kFloat32 ? 4 : 2; }
const char* dtype_name(Nf4Dtype d) {
  return d == Nf4Dtype::kFloat32 ? "fp32" : (d == Nf4Dtype::kFloat16 ? "fp16" : "bf16");
}

// median ms of a D2D copy of `bytes` (read once, written once)
double copy_ms(Timer& timer, size_t bytes);

// The small-M LoRA down-projection: lora (M, r) = s x A^T in float, against nf4_lora_down_cpu (relative 1e-5 of
// sum |x||a|: float accumulation in another order).
bool bench_lora_down(int64_t m, int64_t r, int64_t k, Timer& timer, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint16_t> x(m * k), a(r * k);
  for (auto& v : x) v = fusedrl::float_to_bf16(normal(rng));
  for (auto& v : a) v = fusedrl::float_to_bf16(normal(rng));
  std::vector<float> ref(m * r), got(m * r);
  fusedrl::Nf4LoraDownParams p;
  p.x = x.data();
  p.a = a.data();
  p.lora = ref.data();
  p.m = m;
  p.rank = r;
  p.k = k;
  p.scaling = 2.0f;
  fusedrl::nf4_lora_down_cpu(p);
  float* out = nullptr;
  CUDA_CHECK(cudaMalloc(&out, got.size() * 4));
  CUDA_CHECK(cudaMemset(out, 0xff, got.size() * 4));
  p.x = to_device(x);
  p.a = to_device(a);
  p.lora = out;
  CUDA_CHECK(fusedrl::nf4_lora_down_cuda(p, 0));
  CUDA_CHECK(cudaMemcpy(got.data(), out, got.size() * 4, cudaMemcpyDeviceToHost));
  int64_t bad = 0;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < r; ++j) {
      double mag = 0;
      for (int64_t t = 0; t < k; ++t)
        mag += std::fabs(fusedrl::bf16_to_float(x[i * k + t]) * fusedrl::bf16_to_float(a[j * k + t]));
      if (!(std::fabs(got[i * r + j] - ref[i * r + j]) <= 1e-5 * 2.0 * mag + 1e-30)) ++bad;
    }
  const double ms = timer.time([&] { CUDA_CHECK(fusedrl::nf4_lora_down_cuda(p, 0)); });
  std::printf("lora_down M=%-3lld r=%-3lld K=%-6lld       %8.4f ms  %s\n", static_cast<long long>(m),
              static_cast<long long>(r), static_cast<long long>(k), ms, bad == 0 ? "ok" : "MISMATCH");
  CUDA_CHECK(cudaFree(out));
  return bad == 0;
}

double copy_ms(Timer& timer, size_t bytes) {
  void *a = nullptr, *b = nullptr;
  CUDA_CHECK(cudaMalloc(&a, bytes));
  CUDA_CHECK(cudaMalloc(&b, bytes));
  CUDA_CHECK(cudaMemset(a, 1, bytes));
  const double ms = timer.time([&] { CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, 0)); });
  CUDA_CHECK(cudaFree(a));
  CUDA_CHECK(cudaFree(b));
  return ms;
}

// Dequantize (N, K) into an output of row stride ld (ld > K: the padded scratch the LoRA-folded GEMM uses).
// Validated bit for bit on every element (poisoned first; padding columns must stay poisoned), then timed against a
// D2D copy that moves the same number of bytes: it reads and writes (packed + statistics + output) / 2 bytes each,
// so "x copy" = copy ms / dequant ms = dequant GB/s / copy GB/s at equal traffic (the target is >= 0.85).
bool bench_dequant(const Shape& s, bool nested, Nf4Dtype dtype, Timer& timer, std::mt19937& rng,
                   int64_t blocksize = 64, int64_t pad = 0) {
  Weight w(s.n, s.k, nested, rng, blocksize);
  const int64_t numel = s.n * s.k, ld = s.k + pad, nblocks = (numel + blocksize - 1) / blocksize;
  const size_t elt = element_size(dtype), out_bytes = s.n * ld * elt;
  std::vector<uint8_t> ref(out_bytes, 0xff), got(out_bytes);
  Nf4DequantParams p;
  p.w = w.host;
  p.out = ref.data();
  p.ld = ld;
  p.dtype = dtype;
  fusedrl::nf4_dequantize_cpu(p, 0, nblocks);
  void* out = nullptr;
  CUDA_CHECK(cudaMalloc(&out, out_bytes));
  CUDA_CHECK(cudaMemset(out, 0xff, out_bytes));  // poison: NaN in every dtype
  p.w = w.device;
  p.out = out;
  CUDA_CHECK(fusedrl::nf4_dequantize_cuda(p, 0));
  CUDA_CHECK(cudaDeviceSynchronize());
  CUDA_CHECK(cudaMemcpy(got.data(), out, out_bytes, cudaMemcpyDeviceToHost));
  const bool ok = std::memcmp(got.data(), ref.data(), out_bytes) == 0;
  const double ms = timer.time([&] { CUDA_CHECK(fusedrl::nf4_dequantize_cuda(p, 0)); });
  const double stat_bytes = nested ? nblocks * 1.0 + (nblocks / 256.0) * 4 : nblocks * 4.0;
  const double bytes = numel / 2.0 + stat_bytes + static_cast<double>(numel) * elt;
  const double copy = copy_ms(timer, static_cast<size_t>(bytes / 2));
  std::printf("dequant %-10s %6lld x %-6lld ld %-6lld bs %-3lld %-6s %-4s  %8.4f ms  %7.1f GB/s  copy %7.1f GB/s  "
              "%5.2f x copy  %s\n",
              s.name, static_cast<long long>(s.n), static_cast<long long>(s.k), static_cast<long long>(ld),
              static_cast<long long>(blocksize), nested ? "nested" : "plain", dtype_name(dtype), ms,
              bytes / ms / 1e6, bytes / copy / 1e6, copy / ms, ok ? "bit-exact" : "MISMATCH");
  CUDA_CHECK(cudaFree(out));
  return ok;
}

bool bench_matmul(const Shape& s, int64_t m, Timer& timer, std::mt19937& rng) {
  constexpr int64_t kRank = 16;
  Weight w(s.n, s.k, true, rng);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto bf16_vec = [&](int64_t count) {
    std::vector<uint16_t> v(count);
    for (auto& x : v) x = fusedrl::float_to_bf16(normal(rng));
    return v;
  };
  const std::vector<uint16_t> x = bf16_vec(m * s.k), b = bf16_vec(s.n * kRank), bias = bf16_vec(s.n);
  std::vector<float> lora(m * kRank);
  for (auto& v : lora) v = 0.1f * normal(rng);
  std::vector<uint16_t> got(m * s.n);
  // Reference in double over the weight as the kernel multiplies it: dequantized to bf16 (bit-exact CPU dequant).
  std::vector<uint16_t> wq(s.n * s.k);
  Nf4DequantParams dq;
  dq.w = w.host;
  dq.out = wq.data();
  dq.ld = s.k;
  dq.dtype = Nf4Dtype::kBFloat16;
  fusedrl::nf4_dequantize_cpu(dq, 0, (s.n * s.k + 63) / 64);
  std::vector<double> ref(m * s.n), mag(m * s.n);
  std::vector<float> xf(m * s.k), wrow(s.k);
  for (int64_t i = 0; i < m * s.k; ++i) xf[i] = fusedrl::bf16_to_float(x[i]);
  for (int64_t n = 0; n < s.n; ++n) {
    for (int64_t t = 0; t < s.k; ++t) wrow[t] = fusedrl::bf16_to_float(wq[n * s.k + t]);
    for (int64_t i = 0; i < m; ++i) {
      const float* xr = xf.data() + i * s.k;
      double part[4] = {0, 0, 0, 0}, abs_part[4] = {0, 0, 0, 0};  // independent sums: the CPU overlaps them
      for (int64_t t = 0; t < s.k; t += 4) {
        for (int64_t u = 0; u < 4 && t + u < s.k; ++u) {
          const double prod = static_cast<double>(xr[t + u]) * wrow[t + u];
          part[u] += prod;
          abs_part[u] += std::fabs(prod);
        }
      }
      double acc = (part[0] + part[1]) + (part[2] + part[3]);
      double abs_acc = (abs_part[0] + abs_part[1]) + (abs_part[2] + abs_part[3]);
      for (int64_t j = 0; j < kRank; ++j) {
        const double prod = static_cast<double>(lora[i * kRank + j]) * fusedrl::bf16_to_float(b[n * kRank + j]);
        acc += prod;
        abs_acc += std::fabs(prod);
      }
      acc += fusedrl::bf16_to_float(bias[n]);
      ref[i * s.n + n] = acc;
      mag[i * s.n + n] = abs_acc;
    }
  }
  Nf4MatmulParams p;
  p.w = w.host;
  p.m = m;
  p.ld_y = s.n;
  p.dtype = Nf4Dtype::kBFloat16;
  p.rank = kRank;
  uint16_t* y = nullptr;
  CUDA_CHECK(cudaMalloc(&y, got.size() * 2));
  CUDA_CHECK(cudaMemset(y, 0xff, got.size() * 2));
  p.w = w.device;
  p.x = to_device(x);
  p.y = y;
  p.lora = to_device(lora);
  p.lora_B = to_device(b);
  p.bias = to_device(bias);
  CUDA_CHECK(fusedrl::nf4_matmul_cuda(p, 0));
  CUDA_CHECK(cudaMemcpy(got.data(), y, got.size() * 2, cudaMemcpyDeviceToHost));
  // bf16 output rounding (2^-9 |y|, doubled for slack) + float accumulation in any order (2^-18 of sum |terms|); the
  // CUDA-core kernel (K % 128 != 0) multiplies the unrounded float weight: up to 2^-9 of sum |terms| more.
  const int terms_exponent = s.k % 128 == 0 ? -18 : -8;
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = fusedrl::bf16_to_float(got[i]);
    if (!(std::fabs(g - ref[i]) <= std::ldexp(std::fabs(ref[i]), -8) + std::ldexp(mag[i], terms_exponent) + 1e-6))
      ++bad;
  }
  const double ms = timer.time([&] { CUDA_CHECK(fusedrl::nf4_matmul_cuda(p, 0)); });
  const double bytes = s.n * s.k / 2.0 + (s.n * s.k / 64) + 2.0 * (m * s.k + s.n * kRank + m * s.n + s.n);
  const double copy = copy_ms(timer, static_cast<size_t>(bytes / 2));
  std::printf("matmul  %-10s %6lld x %-6lld M=%-3lld bf16  %8.4f ms  %7.1f GB/s  %5.2f x copy  %s\n", s.name,
              static_cast<long long>(s.n), static_cast<long long>(s.k), static_cast<long long>(m), ms,
              bytes / ms / 1e6, copy / ms, bad == 0 ? "ok" : "MISMATCH");
  if (bad) std::printf("  %lld of %zu outputs outside the tolerance\n", static_cast<long long>(bad), got.size());
  CUDA_CHECK(cudaFree(y));
  return bad == 0;
}

}  // namespace

int main(int argc, char** argv) {
  Timer timer;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--repeats") timer.repeats = std::max(1, std::atoi(argv[i + 1]));
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("bench_nf4 on %s (%d SMs); x copy = D2D copy ms / dequant ms, the copy moving the same bytes\n",
              prop.name, prop.multiProcessorCount);
  // Every dtype x statistics on the small and odd shapes; bf16 (plain, nested) and fp32 (nested) on the large ones.
  const std::vector<Shape> full = {{"llama-q", 4096, 4096}, {"llama-kv", 1024, 4096}, {"odd", 37, 100},
                                   {"odd-big", 1999, 1001}};
  const std::vector<Shape> large = {{"llama-up", 14336, 4096}, {"llama-down", 4096, 14336},
                                    {"llama-gu", 28672, 4096}, {"qwen3-up", 9728, 2560}};
  std::mt19937 rng(1234);
  bool ok = true;
  for (const Shape& s : full)
    for (bool nested : {false, true})
      for (Nf4Dtype d : {Nf4Dtype::kBFloat16, Nf4Dtype::kFloat16, Nf4Dtype::kFloat32})
        ok &= bench_dequant(s, nested, d, timer, rng);
  for (const Shape& s : large) {
    for (bool nested : {false, true}) ok &= bench_dequant(s, nested, Nf4Dtype::kBFloat16, timer, rng);
    ok &= bench_dequant(s, true, Nf4Dtype::kFloat32, timer, rng);
  }
  // blocksizes 128 / 256 and the padded (strided) scratch layout, validation first
  for (int64_t bs : {128, 256})
    for (bool nested : {false, true}) ok &= bench_dequant({"llama-q", 4096, 4096}, nested, Nf4Dtype::kBFloat16, timer, rng, bs);
  for (int64_t pad : {16, 8})
    for (Nf4Dtype d : {Nf4Dtype::kBFloat16, Nf4Dtype::kFloat32})
      ok &= bench_dequant({"llama-q+r", 4096, 4096}, true, d, timer, rng, 64, pad);
  ok &= bench_dequant({"odd+r", 37, 96}, true, Nf4Dtype::kBFloat16, timer, rng, 128, 8);
  for (const Shape& s : {Shape{"llama-q", 4096, 4096}, Shape{"llama-kv", 1024, 4096}, Shape{"llama-up", 14336, 4096},
                         Shape{"llama-down", 4096, 14336}, Shape{"qwen3-up", 9728, 2560}, Shape{"k%128!=0", 200, 4128}}) {
    if (s.k % 32 != 0) continue;  // the fused kernels need K % 32 == 0 (the op falls back otherwise)
    for (int64_t m : {1, 8, 16}) ok &= bench_matmul(s, m, timer, rng);
  }
  for (int64_t m : {1, 16}) ok &= bench_lora_down(m, 16, 4096, timer, rng);
  ok &= bench_lora_down(3, 8, 1000, timer, rng);
  std::printf("bench_nf4: %s\n", ok ? "all validations passed" : "VALIDATION FAILED");
  return ok ? 0 : 1;
}
