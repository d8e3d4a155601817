// Blocks of 32: the arithmetic every d3 kernel shares (the linear layers in linear.cpp, the decoder layer in
// decoder_layer.cpp).
//
// A weight row is made of blocks of 32 weights, each block in a group with one scale (and one offset):
//   q4:  w = q·scale[g] + offset[g], q in 0..15; without offsets (GGUF's Q4_0) w = (q − 8)·scale[g];
//   q5:  the same with q in 0..31 (GGUF's Q5_1; without offsets, Q5_0: w = (q − 16)·scale[g]);
//   q8:  w = q·scale[g], q in -128..127.
// GGUF's k-quants run as the file stores them, in superblocks of 256 weights (8 blocks of 32):
//   q4k, q5k: w = d·sc[b]·q − dmin·m[b], q in 0..15 (0..31), sc and m 6-bit per block of 32 (Q4_K, Q5_K);
//   q6k:      w = d·sc[h]·(q − 32), q in 0..63, sc int8 per half block of 16 (Q6_K).
// A group is one block (a GGUF file's blocks) or several (a float model quantized on load: groups of 64..256, or a
// whole row for int8 per channel). Scales and offsets are float16 where that holds them exactly, else float32. The
// rows are stored in tiles (below), packed by Python (d3cli/core/model/quantized.py).
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
  const int32_t* qsum;    // Σ q over block b
  const int32_t* qsum16;  // Σ q over each half of block b (16 values): [2·b], [2·b + 1]
};

inline void quantize_row(const float* x, int64_t K, int8_t* q, float* d, float* sum, int32_t* qsum,
                         int32_t* qsum16) {
  for (int64_t b = 0; b < K / QK; ++b) {
    const float* xb = x + b * QK;
    float amax = 0.f;
    for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float inverse = amax > 0.f ? 127.f / amax : 0.f;
    int32_t halves[2] = {0, 0};
    for (int i = 0; i < QK; ++i) {
      q[b * QK + i] = static_cast<int8_t>(std::nearbyint(xb[i] * inverse));
      halves[i / 16] += q[b * QK + i];
    }
    const int32_t q_total = halves[0] + halves[1];
    d[b] = amax / 127.f;
    sum[b] = d[b] * static_cast<float>(q_total);
    qsum[b] = q_total;
    qsum16[2 * b] = halves[0], qsum16[2 * b + 1] = halves[1];
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
//
// Five- and six-bit weights add their high bits behind a block's q4 bytes, in "planes" of kTileRows·4 bytes (byte i
// of row r at 4·r + i, the quads' element i): a 5-bit plane's bit k holds bit 4 of quad k's element (k < 4: the low
// halves, elements 4k + i; k ≥ 4: the high halves, 16 + 4(k − 4) + i); a 6-bit block has two planes, the first for
// the low halves and the second for the high halves, bits 2k and 2k + 1 holding bits 4 and 5 of quad k's element.
//
// The k-quants' tiles (q4k, q5k, q6k) hold, per superblock of 256 inputs, a header and then the 8 blocks as above.
// The header holds the rows' block scales as the file stores them, word w of row r at 4·(w·kTileRows + r): Q4_K's
// and Q5_K's 12 bytes of 6-bit scales and minimums (3 words), Q6_K's 16 int8 scales (4 words). `scale` holds each
// superblock's d and `offset` its dmin, float16 [superblocks][kTileRows]: a weight takes the file's bytes, no more.

enum Kind : int64_t { kQ4 = 4, kQ5 = 5, kQ8 = 8, kQ4K = 14, kQ5K = 15, kQ6K = 16 };

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

constexpr bool is_k_quant(int64_t kind) { return kind == kQ4K || kind == kQ5K || kind == kQ6K; }
constexpr int64_t weights_per_group(int64_t kind) { return is_k_quant(kind) ? 256 : QK; }  // k-quants: fixed

// Bytes of one block of 32 of a whole tile: q4 bytes, then the high-bit planes.
template <int64_t kKind>
constexpr int64_t tile_block_bytes() {
  return kKind == kQ8 ? kTileRows * QK
         : kKind == kQ5 || kKind == kQ5K ? kTileRows * 20
         : kKind == kQ6K ? kTileRows * 24 : kTileRows * 16;
}

// Bytes of one superblock of 256 of a whole tile (k-quants): the header, then 8 blocks.
template <int64_t kKind>
constexpr int64_t tile_super_bytes() { return kTileRows * (kKind == kQ6K ? 16 : 12) + 8 * tile_block_bytes<kKind>(); }

// Bytes of a whole tile of a row `columns` wide.
inline int64_t tile_bytes(int64_t kind, int64_t columns) {
  switch (kind) {
    case kQ4: return columns / QK * tile_block_bytes<kQ4>();
    case kQ5: return columns / QK * tile_block_bytes<kQ5>();
    case kQ8: return columns / QK * tile_block_bytes<kQ8>();
    case kQ4K: return columns / 256 * tile_super_bytes<kQ4K>();
    case kQ5K: return columns / 256 * tile_super_bytes<kQ5K>();
    case kQ6K: return columns / 256 * tile_super_bytes<kQ6K>();
  }
  return -1;
}

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
inline FloatVector sub(FloatVector a, FloatVector b) { return _mm512_sub_ps(a, b); }
inline IntVector or_ints(IntVector a, IntVector b) { return _mm512_or_si512(a, b); }
inline IntVector mul_ints(IntVector a, IntVector b) { return _mm512_mullo_epi32(a, b); }
inline IntVector shift_left4(IntVector v) { return _mm512_slli_epi32(v, 4); }  // values < 16 in each byte or word
// (each byte >> shift) & mask; (each word >> shift) & mask; word's byte `byte` as a signed int
inline IntVector byte_bits(IntVector v, int shift, int mask) {
  return _mm512_and_si512(_mm512_srl_epi16(v, _mm_cvtsi32_si128(shift)), _mm512_set1_epi8(static_cast<char>(mask)));
}
inline IntVector word_bits(IntVector v, int shift, int mask) {
  return _mm512_and_si512(_mm512_srl_epi32(v, _mm_cvtsi32_si128(shift)), _mm512_set1_epi32(mask));
}
inline IntVector signed_byte(IntVector v, int byte) {
  return _mm512_srai_epi32(_mm512_sll_epi32(v, _mm_cvtsi32_si128(24 - 8 * byte)), 24);
}
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
inline FloatVector sub(FloatVector a, FloatVector b) { return _mm256_sub_ps(a, b); }
inline IntVector or_ints(IntVector a, IntVector b) { return _mm256_or_si256(a, b); }
inline IntVector mul_ints(IntVector a, IntVector b) { return _mm256_mullo_epi32(a, b); }
inline IntVector shift_left4(IntVector v) { return _mm256_slli_epi32(v, 4); }
inline IntVector byte_bits(IntVector v, int shift, int mask) {
  return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(shift)), _mm256_set1_epi8(static_cast<char>(mask)));
}
inline IntVector word_bits(IntVector v, int shift, int mask) {
  return _mm256_and_si256(_mm256_srl_epi32(v, _mm_cvtsi32_si128(shift)), _mm256_set1_epi32(mask));
}
inline IntVector signed_byte(IntVector v, int byte) {
  return _mm256_srai_epi32(_mm256_sll_epi32(v, _mm_cvtsi32_si128(24 - 8 * byte)), 24);
}
#endif

// The weight of row r, element e (0..31) of a block of a q4/q5/q6 tile (the high-bit planes of blocks.h): q.
template <int64_t kKind>
inline int32_t tile_weight(const uint8_t* block, int64_t r, int e) {
  const int half = e / 16, k = (e % 16) / 4, i = e % 4;
  const uint8_t byte = block[(k * kTileRows + r) * 4 + i];
  int32_t q = half ? byte >> 4 : byte & 0x0F;
  if constexpr (kKind == kQ5 || kKind == kQ5K) q |= ((block[kTileRows * 16 + r * 4 + i] >> (4 * half + k)) & 1) << 4;
  if constexpr (kKind == kQ6K) q |= ((block[kTileRows * (16 + 4 * half) + r * 4 + i] >> (2 * k)) & 3) << 4;
  return q;
}

#if defined(D3_VECTORS)
// Σ q·xq over one q4/q5 block (8 quads) for each of N rows of activations, the weights unpacked once for all of
// them (q with its fifth bit from the plane for q5). Integer sums: exact in any order.
template <int64_t kKind, int N>
inline void block_dots(const uint8_t* weights, const int8_t* const* xq, IntVector* dots) {
  IntVector plane = int_zero();
  if constexpr (kKind == kQ5 || kKind == kQ5K) plane = load_bytes(weights + kTileRows * 16);
  for (int n = 0; n < N; ++n) dots[n] = int_zero();
  for (int i = 0; i < 4; ++i) {
    const IntVector packed = load_bytes(weights + i * kTileRows * 4);
    IntVector low = low_nibbles(packed), high = high_nibbles(packed);
    if constexpr (kKind == kQ5 || kKind == kQ5K) {
      low = or_ints(low, shift_left4(byte_bits(plane, i, 1)));
      high = or_ints(high, shift_left4(byte_bits(plane, 4 + i, 1)));
    }
    for (int n = 0; n < N; ++n) {
      dots[n] = dot_add(dots[n], low, quad(xq[n] + 4 * i));
      dots[n] = dot_add(dots[n], high, quad(xq[n] + 16 + 4 * i));
    }
  }
}

inline void prefetch_block(const uint8_t* weights, int64_t bytes) {
  for (int64_t line = 0; line < bytes; line += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(weights + kPrefetchBytes + line), _MM_HINT_T0);
  }
}
#endif

// Rows of activations a tile is read once for: a prefill's tokens share each tile's unpacked weights (the decode
// step of one row takes the one-row path). Each row's float operations are those of the one-row path, in its order.
#if defined(D3_AVX512)
constexpr int kRowsAtOnce = 4;
#else
constexpr int kRowsAtOnce = 2;  // AVX2's 16 registers
#endif

// out[n·kTileRows + r] = Σ_k w[r][k]·x[n][k] for the kTileRows rows of one tile of a group kind (q4, q5, q8) and
// the N rows of activations x[0..N).
template <int64_t kKind, typename S, int N = 1>
inline void tile_dot(const uint8_t* tile, const S* scale, const S* offset, int64_t blocks, int64_t blocks_per_group,
                     const QuantizedRow* x, float* out) {
  constexpr int64_t kBytes = tile_block_bytes<kKind>();
  constexpr int32_t kCentre = kKind == kQ5 ? 16 : 8;  // centred q4/q5 (no offsets): w = (q − centre)·scale
#if defined(D3_VECTORS)
  FloatVector sums[N], shares[N];
  for (int n = 0; n < N; ++n) sums[n] = float_zero(), shares[n] = float_zero();
  int64_t b = 0;
  for (int64_t g = 0; g < blocks / blocks_per_group; ++g) {
    const FloatVector group_scale = load_scales(scale + g * kTileRows);
    const FloatVector group_offset = offset != nullptr ? load_scales(offset + g * kTileRows) : float_zero();
    for (int64_t j = 0; j < blocks_per_group; ++j, ++b) {
      const uint8_t* weights = tile + b * kBytes;
      prefetch_block(weights, kBytes);
      const int8_t* xq[N];
      for (int n = 0; n < N; ++n) xq[n] = x[n].q + b * QK;
      IntVector dots[N];
      if constexpr (kKind != kQ8) {
        block_dots<kKind, N>(weights, xq, dots);
        if (offset == nullptr) {  // Σ (q − c)·xq, exactly
          for (int n = 0; n < N; ++n) dots[n] = add_ints(dots[n], broadcast_int(-kCentre * x[n].qsum[b]));
        }
      } else if constexpr (kUnsignedQ8) {  // Σ (w + 128)·x − 128·Σ x
        for (int n = 0; n < N; ++n) dots[n] = int_zero();
        for (int i = 0; i < 8; ++i) {
          const IntVector w = load_bytes(weights + i * kTileRows * 4);
          for (int n = 0; n < N; ++n) dots[n] = dot_add(dots[n], w, quad(xq[n] + 4 * i));
        }
        for (int n = 0; n < N; ++n) dots[n] = add_ints(dots[n], broadcast_int(-128 * x[n].qsum[b]));
      } else {  // signed weights (AVX2 without VNNI): |w| times x with w's sign
#if !defined(D3_AVX512)
        for (int n = 0; n < N; ++n) dots[n] = int_zero();
        for (int i = 0; i < 8; ++i) {
          const IntVector w = load_bytes(weights + i * kTileRows * 4);
          const IntVector magnitude = _mm256_sign_epi8(w, w);
          for (int n = 0; n < N; ++n) {
            dots[n] = dot_add(dots[n], magnitude, _mm256_sign_epi8(quad(xq[n] + 4 * i), w));
          }
        }
#endif
      }
      for (int n = 0; n < N; ++n) {
        sums[n] = fma(to_floats(dots[n]), mul(group_scale, broadcast(x[n].d[b])), sums[n]);
        if (offset != nullptr) shares[n] = fma(group_offset, broadcast(x[n].sum[b]), shares[n]);
      }
    }
  }
  for (int n = 0; n < N; ++n) store(out + n * kTileRows, add(sums[n], shares[n]));
#else
  for (int n = 0; n < N; ++n) {
    for (int64_t r = 0; r < kTileRows; ++r) {
      float sums = 0.f, shares = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* weights = tile + b * kBytes;
        const int8_t* xq = x[n].q + b * QK;
        int32_t dots = 0;
        for (int e = 0; e < QK; ++e) {
          if constexpr (kKind == kQ8) {
            const int j = e / 4, i = e % 4;
            const uint8_t byte = weights[(j * kTileRows + r) * 4 + i];
            const int32_t w = kUnsignedQ8 ? static_cast<int32_t>(byte) - 128 : static_cast<int8_t>(byte);
            dots += w * xq[e];
          } else {
            dots += tile_weight<kKind>(weights, r, e) * xq[e];
          }
        }
        if (kKind != kQ8 && offset == nullptr) dots -= kCentre * x[n].qsum[b];
        const int64_t g = b / blocks_per_group;
        sums = std::fma(static_cast<float>(dots), to_float(scale[g * kTileRows + r]) * x[n].d[b], sums);
        if (offset != nullptr) shares = std::fma(to_float(offset[g * kTileRows + r]), x[n].sum[b], shares);
      }
      out[n * kTileRows + r] = sums + shares;
    }
  }
#endif
}

// out[n·kTileRows + r] = Σ_k w[r][k]·x[n][k] for the kTileRows rows of one tile of a k-quant (q4k, q5k, q6k) and N
// rows of activations: per superblock s, d[s]·Σ_b sc[b]·Σ q·x − dmin[s]·Σ_b m[b]·Σ x
// (q6k: d[s]·Σ_h sc[h]·Σ (q − 32)·x over halves of 16).
template <int64_t kKind, int N = 1>
inline void tile_dot_k(const uint8_t* tile, const c10::Half* d, const c10::Half* dmin, int64_t supers,
                       const QuantizedRow* x, float* out) {
  constexpr int64_t kBlock = tile_block_bytes<kKind>(), kHeader = kTileRows * (kKind == kQ6K ? 16 : 12);
#if defined(D3_VECTORS)
  FloatVector sums[N], mins[N];
  for (int n = 0; n < N; ++n) sums[n] = float_zero(), mins[n] = float_zero();
  for (int64_t s = 0; s < supers; ++s) {
    const uint8_t* super = tile + s * tile_super_bytes<kKind>();
    IntVector words[4];
    for (int w = 0; w < (kKind == kQ6K ? 4 : 3); ++w) words[w] = load_bytes(super + w * kTileRows * 4);
    FloatVector scaled[N], taken[N];
    for (int n = 0; n < N; ++n) scaled[n] = float_zero(), taken[n] = float_zero();
    for (int j = 0; j < 8; ++j) {
      const int64_t b = s * 8 + j;
      const uint8_t* weights = super + kHeader + j * kBlock;
      prefetch_block(weights, kBlock);
      const int8_t* xq[N];
      for (int n = 0; n < N; ++n) xq[n] = x[n].q + b * QK;
      if constexpr (kKind == kQ6K) {
        const IntVector plane_low = load_bytes(weights + kTileRows * 16);
        const IntVector plane_high = load_bytes(weights + kTileRows * 20);
        IntVector low[N], high[N];
        for (int n = 0; n < N; ++n) low[n] = int_zero(), high[n] = int_zero();
        for (int i = 0; i < 4; ++i) {
          const IntVector packed = load_bytes(weights + i * kTileRows * 4);
          const IntVector low_q = or_ints(low_nibbles(packed), shift_left4(byte_bits(plane_low, 2 * i, 3)));
          const IntVector high_q = or_ints(high_nibbles(packed), shift_left4(byte_bits(plane_high, 2 * i, 3)));
          for (int n = 0; n < N; ++n) {
            low[n] = dot_add(low[n], low_q, quad(xq[n] + 4 * i));
            high[n] = dot_add(high[n], high_q, quad(xq[n] + 16 + 4 * i));
          }
        }
        const int h = 2 * j;  // the half blocks' scales h and h + 1: bytes of word h / 4
        const IntVector scale_low = signed_byte(words[h / 4], h % 4), scale_high = signed_byte(words[h / 4], h % 4 + 1);
        for (int n = 0; n < N; ++n) {
          low[n] = add_ints(low[n], broadcast_int(-32 * x[n].qsum16[2 * b]));
          high[n] = add_ints(high[n], broadcast_int(-32 * x[n].qsum16[2 * b + 1]));
          const IntVector total = add_ints(mul_ints(low[n], scale_low), mul_ints(high[n], scale_high));
          scaled[n] = fma(to_floats(total), broadcast(x[n].d[b]), scaled[n]);
        }
      } else {
        IntVector dots[N];
        block_dots<kKind, N>(weights, xq, dots);
        IntVector sc, m;  // llama.cpp's get_scale_min_k4, a lane a row
        if (j < 4) {
          sc = word_bits(words[0], 8 * j, 63), m = word_bits(words[1], 8 * j, 63);
        } else {
          const int k = j - 4;
          sc = or_ints(word_bits(words[2], 8 * k, 15), shift_left4(word_bits(words[0], 8 * k + 6, 3)));
          m = or_ints(word_bits(words[2], 8 * k + 4, 15), shift_left4(word_bits(words[1], 8 * k + 6, 3)));
        }
        const FloatVector minimums = to_floats(m);
        for (int n = 0; n < N; ++n) {
          scaled[n] = fma(to_floats(mul_ints(dots[n], sc)), broadcast(x[n].d[b]), scaled[n]);
          taken[n] = fma(minimums, broadcast(x[n].sum[b]), taken[n]);
        }
      }
    }
    const FloatVector super_scale = load_scales(d + s * kTileRows);
    const FloatVector super_min = kKind != kQ6K ? load_scales(dmin + s * kTileRows) : float_zero();
    for (int n = 0; n < N; ++n) {
      sums[n] = fma(scaled[n], super_scale, sums[n]);
      if constexpr (kKind != kQ6K) mins[n] = fma(taken[n], super_min, mins[n]);
    }
  }
  for (int n = 0; n < N; ++n) store(out + n * kTileRows, sub(sums[n], mins[n]));
#else
  for (int n = 0; n < N; ++n) {
    for (int64_t r = 0; r < kTileRows; ++r) {
      float sums = 0.f, mins = 0.f;
      for (int64_t s = 0; s < supers; ++s) {
        const uint8_t* super = tile + s * tile_super_bytes<kKind>();
        uint8_t header[16];
        for (int w = 0; w < (kKind == kQ6K ? 4 : 3); ++w) {
          for (int i = 0; i < 4; ++i) header[4 * w + i] = super[(w * kTileRows + r) * 4 + i];
        }
        float scaled = 0.f, taken = 0.f;
        for (int j = 0; j < 8; ++j) {
          const int64_t b = s * 8 + j;
          const uint8_t* weights = super + kHeader + j * kBlock;
          const int8_t* xq = x[n].q + b * QK;
          int32_t halves[2] = {0, 0};
          for (int e = 0; e < QK; ++e) halves[e / 16] += tile_weight<kKind>(weights, r, e) * xq[e];
          if constexpr (kKind == kQ6K) {
            const int32_t total = (halves[0] - 32 * x[n].qsum16[2 * b]) * static_cast<int8_t>(header[2 * j]) +
                                  (halves[1] - 32 * x[n].qsum16[2 * b + 1]) * static_cast<int8_t>(header[2 * j + 1]);
            scaled = std::fma(static_cast<float>(total), x[n].d[b], scaled);
          } else {
            const uint8_t* q = header;
            const int32_t sc = j < 4 ? q[j] & 63 : (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
            const int32_t m = j < 4 ? q[j + 4] & 63 : (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
            scaled = std::fma(static_cast<float>((halves[0] + halves[1]) * sc), x[n].d[b], scaled);
            taken = std::fma(static_cast<float>(m), x[n].sum[b], taken);
          }
        }
        sums = std::fma(scaled, to_float(d[s * kTileRows + r]), sums);
        if (kKind != kQ6K) mins = std::fma(taken, to_float(dmin[s * kTileRows + r]), mins);
      }
      out[n * kTileRows + r] = sums - mins;
    }
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
