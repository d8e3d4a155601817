// Float arithmetic over short arrays for the decoder layer: dot products, scaled additions and exp, vectorized
// where the CPU can. Each function computes every element by the same operations wherever the array starts, so a
// token's row gives the same result in a prefill and in a decode step.

#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "blocks.h"

namespace d3 {

#ifdef D3_AVX2
// exp of 8 floats: the classic range reduction exp(x) = 2^n·exp(r), r = x − n·ln 2, and a degree-6 polynomial (the
// Cephes coefficients); relative error about 2e-7 for inputs in [−87, 88]; 0 below.
inline __m256 exp8(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.33654f);
  const __m256 underflow = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, low), _mm256_set1_ps(88.3762626647949f));
  __m256 n = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                           _mm256_set1_ps(0.5f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(exponent)));
}
#endif

// The same function one float at a time (for array tails: the same operations in the same order).
inline float exp1(float x) {
#ifdef D3_AVX2
  return _mm256_cvtss_f32(exp8(_mm256_set1_ps(x)));
#else
  return std::exp(x);
#endif
}

// values[i] = exp(values[i] − shift)
inline void exp_shifted(float* values, int64_t count, float shift) {
  int64_t i = 0;
#ifdef D3_AVX2
  const __m256 s = _mm256_set1_ps(shift);
  for (; i + 8 <= count; i += 8) _mm256_storeu_ps(values + i, exp8(_mm256_sub_ps(_mm256_loadu_ps(values + i), s)));
#endif
  for (; i < count; ++i) values[i] = exp1(values[i] - shift);
}

// out[i] = gate[i] / (1 + exp(−gate[i])) · up[i]: the gated SiLU of the MLP
inline void silu_times(const float* gate, const float* up, int64_t count, float* out) {
  int64_t i = 0;
#ifdef D3_AVX2
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  for (; i + 8 <= count; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, g))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
  }
#endif
  for (; i < count; ++i) out[i] = gate[i] / (1.f + exp1(-gate[i])) * up[i];
}

// The largest of `count` values (none NaN): the same whatever the order, so vectors may take them in any.
inline float largest_of(const float* values, int64_t count) {
  float largest = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#ifdef D3_AVX2
  __m256 top = _mm256_set1_ps(largest);
  for (; i + 8 <= count; i += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(values + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top);
  for (int lane = 0; lane < 8; ++lane) largest = std::max(largest, lanes[lane]);
#endif
  for (; i < count; ++i) largest = std::max(largest, values[i]);
  return largest;
}

// Σ values: eight running sums, then their sum and the remainder (a fixed order for a given count).
inline float total_of(const float* values, int64_t count) {
  int64_t i = 0;
  float total = 0.f;
#ifdef D3_AVX2
  __m256 sums = _mm256_setzero_ps();
  for (; i + 8 <= count; i += 8) sums = _mm256_add_ps(sums, _mm256_loadu_ps(values + i));
  total = sum_lanes(sums);
#endif
  for (; i < count; ++i) total += values[i];
  return total;
}

inline float dot(const float* a, const float* b, int64_t size) {
  int64_t i = 0;
  float total = 0.f;
#ifdef D3_AVX2
  __m256 sums = _mm256_setzero_ps();
  for (; i + 8 <= size; i += 8) sums = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), sums);
  total = sum_lanes(sums);
#endif
  for (; i < size; ++i) total = std::fma(a[i], b[i], total);
  return total;
}

// out += weight·v
inline void add_scaled(float* out, const float* v, float weight, int64_t size) {
  int64_t i = 0;
#ifdef D3_AVX2
  const __m256 w = _mm256_set1_ps(weight);
  for (; i + 8 <= size; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(w, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
  }
#endif
  for (; i < size; ++i) out[i] = std::fma(weight, v[i], out[i]);
}

}  // namespace d3
