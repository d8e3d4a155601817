// Blocks of 32: the arithmetic every d3 kernel shares (the linear layers in linear.cpp, the decoder layer in
// decoder_layer.cpp).
//
// A weight row is made of blocks of 32 weights, each block in a group with one scale (and one offset):
//   q4:  w = q·scale[g] + offset[g], q in 0..15; without offsets (GGUF's Q4_0) w = (q − 8)·scale[g];
//   q8:  w = q·scale[g], q in -128..127.
// A group is one block (a GGUF file's blocks) or several (a float model quantized on load: groups of 64..256, or a
// whole row for int8 per channel). Scales and offsets are float16 where that holds them exactly, else float32. The
// rows are stored in tiles (below), packed by Python (d3cli/core/quantized.py).
//
// Activations are quantized per block of 32 to int8 with one float scale (x ≈ d·q, as llama.cpp's Q8 blocks), and
// each block's product is one integer dot product: Σ w·x̂ = scale·d·Σ q·xq + offset·d·Σ xq, exactly the product of
// the weights and the quantized activations x̂. Every output element is computed by the same operations in the same
// order whatever the number of rows, threads or other outputs (fused multiply-adds only where written,
// -ffp-contract=off): a row of x gives the same result alone or in a batch, so cached decoding equals a full
// recomputation.

#pragma once

#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define D3_AVX2 1
#endif

namespace d3 {

constexpr int64_t QK = 32;  // weights (and activations) per block

// ---- activations ---------------------------------------------------------------------------------------------------

// One row of activations as int8 blocks: x[32·b + i] ≈ d[b]·q[32·b + i]; sum[b] = d[b]·Σ q over block b, the sum
// of the quantized activations (the offsets' share is taken of them too: the product is then exactly that of the
// weights and the quantized activations, whose errors the centred weights average out better than q·scale alone).
struct QuantizedRow {
  const int8_t* q;
  const float* d;
  const float* sum;
  const int32_t* qsum;  // Σ q over block b
};

inline void quantize_row(const float* x, int64_t K, int8_t* q, float* d, float* sum, int32_t* qsum) {
  for (int64_t b = 0; b < K / QK; ++b) {
    const float* xb = x + b * QK;
    float amax = 0.f;
    for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float inverse = amax > 0.f ? 127.f / amax : 0.f;
    int32_t q_total = 0;
    for (int i = 0; i < QK; ++i) {
      q[b * QK + i] = static_cast<int8_t>(std::nearbyint(xb[i] * inverse));
      q_total += q[b * QK + i];
    }
    d[b] = amax / 127.f;
    sum[b] = d[b] * static_cast<float>(q_total);
    qsum[b] = q_total;
  }
}

// ---- scales and sums --------------------------------------------------------------------------------------------------------

inline float to_float(c10::Half value) {
#ifdef D3_AVX2
  return _cvtsh_ss(value.x);
#else
  return static_cast<float>(value);
#endif
}
inline float to_float(float value) { return value; }

#ifdef D3_AVX2
inline float sum_lanes(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#endif

// ---- weight tiles --------------------------------------------------------------------------------------------------
//
// Weights are stored in tiles of kTileRows output rows, so that one vector register holds one weight of each row of
// the tile and one lane accumulates one row: no sums across lanes, and each row is still computed alone (its own
// lane, blocks in order). A tile holds, for each block of 32 inputs, the rows' weights grouped by four consecutive
// inputs (a "quad"): vector j holds quad j of every row (4 bytes a row, rows in order). In q4 tiles one byte holds
// quad j in its low half and quad j + 4 in its high half (kTileRows·16 bytes a block); q8 tiles hold the eight quads
// one to a byte (kTileRows·32 bytes a block), as unsigned w + 128 where the CPU has VNNI (vpdpbusd multiplies
// unsigned by signed bytes), signed otherwise. Scales and offsets are [groups][kTileRows]. Python packs the tiles
// (quantized.py), asking `layout()` for kTileRows and the q8 form.

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define D3_AVX512 1
constexpr int64_t kTileRows = 16;
#else
constexpr int64_t kTileRows = 8;
#endif
#if defined(D3_AVX512) || (defined(D3_AVX2) && defined(__AVXVNNI__))
constexpr bool kUnsignedQ8 = true;
#else
constexpr bool kUnsignedQ8 = false;
#endif

template <bool kQ4>
constexpr int64_t tile_block_bytes() { return kQ4 ? kTileRows * QK / 2 : kTileRows * QK; }

// How far ahead of the block being read its weights are prefetched: tiles lie one after another, so this runs into
// the next tiles of the same thread. Measured on the project's machine (docs/PERFORMANCE.md): 2 KiB ahead turns a
// decode step's products from bound by memory latency to bound by bandwidth.
constexpr int64_t kPrefetchBytes = 2048;

#if defined(D3_AVX512) || defined(D3_AVX2)
#define D3_VECTORS 1
#endif
#if defined(D3_AVX512)
constexpr int64_t kLanes = 16;
using IntVector = __m512i;
using FloatVector = __m512;
inline IntVector int_zero() { return _mm512_setzero_si512(); }
inline FloatVector float_zero() { return _mm512_setzero_ps(); }
inline IntVector load_bytes(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline IntVector quad(const int8_t* x) { return _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x)); }
inline IntVector low_nibbles(IntVector v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
inline IntVector high_nibbles(IntVector v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }
inline IntVector dot_add(IntVector sums, IntVector u, IntVector s) { return _mm512_dpbusd_epi32(sums, u, s); }
inline IntVector add_ints(IntVector a, IntVector b) { return _mm512_add_epi32(a, b); }
inline IntVector broadcast_int(int32_t v) { return _mm512_set1_epi32(v); }
inline FloatVector to_floats(IntVector v) { return _mm512_cvtepi32_ps(v); }
inline FloatVector broadcast(float v) { return _mm512_set1_ps(v); }
inline FloatVector mul(FloatVector a, FloatVector b) { return _mm512_mul_ps(a, b); }
inline FloatVector add(FloatVector a, FloatVector b) { return _mm512_add_ps(a, b); }
inline FloatVector fma(FloatVector a, FloatVector b, FloatVector c) { return _mm512_fmadd_ps(a, b, c); }
inline FloatVector load_scales(const float* p) { return _mm512_loadu_ps(p); }
inline FloatVector load_scales(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void store(float* out, FloatVector v) { _mm512_storeu_ps(out, v); }
inline FloatVector load_floats(const float* p) { return _mm512_loadu_ps(p); }
inline float sum_all(FloatVector v) { return _mm512_reduce_add_ps(v); }
#elif defined(D3_AVX2)
constexpr int64_t kLanes = 8;
using IntVector = __m256i;
using FloatVector = __m256;
inline IntVector int_zero() { return _mm256_setzero_si256(); }
inline FloatVector float_zero() { return _mm256_setzero_ps(); }
inline IntVector load_bytes(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline IntVector quad(const int8_t* x) { return _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(x)); }
inline IntVector low_nibbles(IntVector v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
inline IntVector high_nibbles(IntVector v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }
inline IntVector dot_add(IntVector sums, IntVector u, IntVector s) {  // sums + Σ of 4 products u·s per lane
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(sums, u, s);
#else
  return _mm256_add_epi32(sums, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
inline IntVector add_ints(IntVector a, IntVector b) { return _mm256_add_epi32(a, b); }
inline IntVector broadcast_int(int32_t v) { return _mm256_set1_epi32(v); }
inline FloatVector to_floats(IntVector v) { return _mm256_cvtepi32_ps(v); }
inline FloatVector broadcast(float v) { return _mm256_set1_ps(v); }
inline FloatVector mul(FloatVector a, FloatVector b) { return _mm256_mul_ps(a, b); }
inline FloatVector add(FloatVector a, FloatVector b) { return _mm256_add_ps(a, b); }
inline FloatVector fma(FloatVector a, FloatVector b, FloatVector c) { return _mm256_fmadd_ps(a, b, c); }
inline FloatVector load_scales(const float* p) { return _mm256_loadu_ps(p); }
inline FloatVector load_scales(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void store(float* out, FloatVector v) { _mm256_storeu_ps(out, v); }
inline FloatVector load_floats(const float* p) { return _mm256_loadu_ps(p); }
inline float sum_all(FloatVector v) { return sum_lanes(v); }
#endif

// out[r] = Σ_k w[r][k]·x[k] for the kTileRows rows of one tile.
template <bool kQ4, typename S>
inline void tile_dot(const uint8_t* tile, const S* scale, const S* offset, int64_t blocks, int64_t blocks_per_group,
                     const QuantizedRow& x, float* out) {
  constexpr int64_t kBytes = tile_block_bytes<kQ4>();
#if defined(D3_AVX512) || defined(D3_AVX2)
  FloatVector sums = float_zero(), shares = float_zero();
  int64_t b = 0;
  for (int64_t g = 0; g < blocks / blocks_per_group; ++g) {
    const FloatVector group_scale = load_scales(scale + g * kTileRows);
    const FloatVector group_offset = offset != nullptr ? load_scales(offset + g * kTileRows) : float_zero();
    for (int64_t j = 0; j < blocks_per_group; ++j, ++b) {
      const uint8_t* weights = tile + b * kBytes;
      for (int64_t line = 0; line < kBytes; line += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(weights + kPrefetchBytes + line), _MM_HINT_T0);
      }
      const int8_t* xq = x.q + b * QK;
      IntVector dots = int_zero();
      if constexpr (kQ4) {
        for (int i = 0; i < 4; ++i) {
          const IntVector packed = load_bytes(weights + i * kTileRows * 4);
          dots = dot_add(dots, low_nibbles(packed), quad(xq + 4 * i));
          dots = dot_add(dots, high_nibbles(packed), quad(xq + 16 + 4 * i));
        }
        if (offset == nullptr) dots = add_ints(dots, broadcast_int(-8 * x.qsum[b]));  // Σ (q − 8)·xq, exactly
      } else if constexpr (kUnsignedQ8) {  // Σ (w + 128)·x − 128·Σ x
        for (int i = 0; i < 8; ++i) dots = dot_add(dots, load_bytes(weights + i * kTileRows * 4), quad(xq + 4 * i));
        dots = add_ints(dots, broadcast_int(-128 * x.qsum[b]));
      } else {  // signed weights (AVX2 without VNNI): |w| times x with w's sign
#if !defined(D3_AVX512)
        for (int i = 0; i < 8; ++i) {
          const IntVector w = load_bytes(weights + i * kTileRows * 4);
          dots = dot_add(dots, _mm256_sign_epi8(w, w), _mm256_sign_epi8(quad(xq + 4 * i), w));
        }
#endif
      }
      sums = fma(to_floats(dots), mul(group_scale, broadcast(x.d[b])), sums);
      if (offset != nullptr) shares = fma(group_offset, broadcast(x.sum[b]), shares);
    }
  }
  store(out, add(sums, shares));
#else
  for (int64_t r = 0; r < kTileRows; ++r) {
    float sums = 0.f, shares = 0.f;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* weights = tile + b * kBytes;
      const int8_t* xq = x.q + b * QK;
      int32_t dots = 0;
      for (int i = 0; i < (kQ4 ? 4 : 8); ++i) {
        for (int e = 0; e < 4; ++e) {
          const uint8_t byte = weights[(i * kTileRows + r) * 4 + e];
          if constexpr (kQ4) {
            dots += static_cast<int32_t>(byte & 0x0F) * xq[4 * i + e] + static_cast<int32_t>(byte >> 4) * xq[16 + 4 * i + e];
          } else {
            const int32_t w = kUnsignedQ8 ? static_cast<int32_t>(byte) - 128 : static_cast<int8_t>(byte);
            dots += w * xq[4 * i + e];
          }
        }
      }
      if (kQ4 && offset == nullptr) dots -= 8 * x.qsum[b];  // centred q4: Σ (q − 8)·xq
      const int64_t g = b / blocks_per_group;
      sums = std::fma(static_cast<float>(dots), to_float(scale[g * kTileRows + r]) * x.d[b], sums);
      if (offset != nullptr) shares = std::fma(to_float(offset[g * kTileRows + r]), x.sum[b], shares);
    }
    out[r] = sums + shares;
  }
#endif
}

// The tiles [begin, end) of `tiles` that thread `thread` of `threads` computes: contiguous, as even as can be.
inline void thread_tiles(int64_t tiles, int thread, int threads, int64_t& begin, int64_t& end) {
  const int64_t per = tiles / threads, extra = tiles % threads;
  begin = thread * per + std::min<int64_t>(thread, extra);
  end = begin + per + (thread < extra ? 1 : 0);
}

}  // namespace d3
