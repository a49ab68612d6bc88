// nf4_cpu: the CPU kernels of nf4.h (dequantize, quantize, the nested absmax quantizer, small-M matmul).
// Compiled with -ffp-contract=off (CMakeLists.txt): bit-exactness with bitsandbytes needs every product rounded
// before the following addition. Inner loops are written over fixed-length runs so the compiler vectorises them.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "half_cpu.h"
#include "nf4.h"

namespace fusedrl {
namespace {

float load_value(const void* x, Nf4Dtype dtype, int64_t i) {
  switch (dtype) {
    case Nf4Dtype::kFloat32: return static_cast<const float*>(x)[i];
    case Nf4Dtype::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(x)[i]);
    default: return bf16_to_float(static_cast<const uint16_t*>(x)[i]);
  }
}

// Converts `count` float32 values to `dtype` at out + offset (elements).
void store_run(void* out, Nf4Dtype dtype, int64_t offset, const float* values, int64_t count) {
  switch (dtype) {
    case Nf4Dtype::kFloat32:
      std::memcpy(static_cast<float*>(out) + offset, values, count * sizeof(float));
      break;
    case Nf4Dtype::kFloat16: {
      uint16_t* o = static_cast<uint16_t*>(out) + offset;
      for (int64_t i = 0; i < count; ++i) o[i] = float_to_fp16(values[i]);
      break;
    }
    default: {
      uint16_t* o = static_cast<uint16_t*>(out) + offset;
      for (int64_t i = 0; i < count; ++i) o[i] = float_to_bf16(values[i]);
    }
  }
}

// code of element i (flat index) of a packed weight
inline int nibble(const uint8_t* packed, int64_t i) { return (i & 1) ? packed[i >> 1] & 15 : packed[i >> 1] >> 4; }

}  // namespace

void nf4_dequantize_cpu(const Nf4DequantParams& p, int64_t block_begin, int64_t block_end) {
  const Nf4Weight& w = p.w;
  const int64_t n = w.rows * w.cols;
  std::vector<float> run(static_cast<size_t>(w.blocksize));
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * w.blocksize, stop = std::min(n, start + w.blocksize);
    const float scale = nf4_block_scale(w, b);
    const bool even_start = (start & 1) == 0;
    // Decode the block into float32 (the product rounded once), then write it out row piece by row piece.
    if (even_start && ((stop - start) & 1) == 0) {
      const uint8_t* bytes = w.packed + (start >> 1);
      for (int64_t j = 0; j < (stop - start) >> 1; ++j) {
        run[2 * j] = kNf4Code[bytes[j] >> 4] * scale;
        run[2 * j + 1] = kNf4Code[bytes[j] & 15] * scale;
      }
    } else {
      for (int64_t i = start; i < stop; ++i) run[i - start] = kNf4Code[nibble(w.packed, i)] * scale;
    }
    for (int64_t i = start; i < stop;) {
      const int64_t row = i / w.cols, col = i % w.cols;
      const int64_t count = std::min(stop - i, w.cols - col);
      store_run(p.out, p.dtype, row * p.ld + col, run.data() + (i - start), count);
      i += count;
    }
  }
}

void nf4_quantize_cpu(const void* x, Nf4Dtype dtype, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                      int64_t block_begin, int64_t block_end) {
  std::vector<float> values(static_cast<size_t>(blocksize));
  std::vector<uint8_t> codes(static_cast<size_t>(blocksize) + 1, 0);
  float thresholds[15];  // float32 midpoints, as bitsandbytes' CPU op computes them
  for (int i = 0; i < 15; ++i) thresholds[i] = (kNf4Code[i] + kNf4Code[i + 1]) / 2.0f;
  const int64_t full_blocks = n / blocksize;
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * blocksize, count = std::min(n, start + blocksize) - start;
    float amax = 0.0f;
    for (int64_t i = 0; i < count; ++i) {
      values[i] = load_value(x, dtype, start + i);
      amax = std::max(amax, std::fabs(values[i]));
    }
    absmax[b] = amax;
    const float safe = std::max(amax, 1e-38f);  // torch's clamp(min=1e-38)
    if (b < full_blocks) {
      const float scale = 1.0f / safe;
      for (int64_t i = 0; i < count; ++i) codes[i] = nf4_index(std::clamp(values[i] * scale, -1.0f, 1.0f), thresholds);
    } else {  // bitsandbytes' CPU op divides in the partial last block
      for (int64_t i = 0; i < count; ++i) codes[i] = nf4_index(std::clamp(values[i] / safe, -1.0f, 1.0f), thresholds);
    }
    // Blocks have even length except the last one, so a block's first element is the high nibble of a byte.
    codes[count] = static_cast<uint8_t>(nf4_index(0.0f, thresholds));  // pads an odd total, as bitsandbytes does
    for (int64_t i = 0; i < count; i += 2) packed[(start + i) >> 1] = static_cast<uint8_t>(codes[i] << 4 | codes[i + 1]);
  }
}

namespace {

constexpr int kLutSize = 65536;

// bitsandbytes' CPU lookup table for a sorted 256-entry map: bin i covers the value -1 + 2i / 65535 and holds
// the first entry whose upper midpoint is not below that value.
std::vector<uint8_t> blockwise8_lut(const float* code) {
  float midpoints[255];
  for (int i = 0; i < 255; ++i) midpoints[i] = 0.5f * (code[i] + code[i + 1]);
  std::vector<uint8_t> lut(kLutSize);
  int idx = 0;
  for (int i = 0; i < kLutSize; ++i) {
    const float value = -1.0f + (2.0f * static_cast<float>(i)) / static_cast<float>(kLutSize - 1);
    while (idx < 255 && midpoints[idx] < value) ++idx;
    lut[i] = static_cast<uint8_t>(idx);
  }
  return lut;
}

}  // namespace

void blockwise8_quantize_cpu(const float* x, int64_t n, int64_t blocksize, const float* code, uint8_t* out,
                             float* absmax, int64_t block_begin, int64_t block_end) {
  const std::vector<uint8_t> lut = blockwise8_lut(code);
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * blocksize, stop = std::min(n, start + blocksize);
    float amax = 0.0f;
    for (int64_t i = start; i < stop; ++i) amax = std::max(amax, std::fabs(x[i]));
    absmax[b] = amax;
    if (amax == 0.0f) {
      std::fill(out + start, out + stop, uint8_t{0});
      continue;
    }
    const float inv = 1.0f / amax;
    for (int64_t i = start; i < stop; ++i) {
      const float v = std::clamp(x[i] * inv, -1.0f, 1.0f);
      // bitsandbytes' compiled index: one fused multiply-add (its build contracts `* 65535 + 0.5`).
      const int bin = static_cast<int>(std::fma((v + 1.0f) * 0.5f, static_cast<float>(kLutSize - 1), 0.5f));
      out[i] = lut[static_cast<uint16_t>(bin)];
    }
  }
}

void nf4_matmul_cpu(const Nf4MatmulParams& p, int64_t row_begin, int64_t row_end) {
  const Nf4Weight& w = p.w;
  const int64_t k = w.cols;
  std::vector<float> xf(static_cast<size_t>(p.m * k)), wrow(static_cast<size_t>(k)), acc(static_cast<size_t>(p.m));
  for (int64_t i = 0; i < p.m * k; ++i) xf[i] = load_value(p.x, p.dtype, i);
  for (int64_t n = row_begin; n < row_end; ++n) {
    for (int64_t c = 0; c < k; ++c) {
      const int64_t i = n * k + c;
      wrow[c] = kNf4Code[nibble(w.packed, i)] * nf4_block_scale(w, i / w.blocksize);
    }
    for (int64_t m = 0; m < p.m; ++m) {
      float s = 0.0f;
      const float* xr = xf.data() + m * k;
      for (int64_t c = 0; c < k; ++c) s += xr[c] * wrow[c];
      if (p.lora != nullptr)
        for (int64_t j = 0; j < p.rank; ++j) s += p.lora[m * p.rank + j] * load_value(p.lora_B, p.dtype, n * p.rank + j);
      if (p.bias != nullptr) s += load_value(p.bias, p.dtype, n);
      acc[m] = s;
    }
    for (int64_t m = 0; m < p.m; ++m) store_run(p.y, p.dtype, m * p.ld_y + n, &acc[m], 1);
  }
}

void nf4_lora_down_cpu(const Nf4LoraDownParams& p) {
  for (int64_t i = 0; i < p.m; ++i) {
    for (int64_t j = 0; j < p.rank; ++j) {
      float s = 0.0f;
      for (int64_t k = 0; k < p.k; ++k) s += load_value(p.x, p.dtype, i * p.k + k) * load_value(p.a, p.dtype, j * p.k + k);
      p.lora[i * p.rank + j] = s * p.scaling;
    }
  }
}

}  // namespace fusedrl
