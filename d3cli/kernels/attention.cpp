// A decoder layer's attention over its key/value cache (attention.h): softmax(q·Kᵀ·scaling)·V for every query head
// of a call, over the float16 keys and values the layer keeps (grouped-query heads: the query heads of one key/value
// head read each key and value once), a vector path for every head size up to 16 vectors and a scalar one besides.
//
// Attention works in chunks of kChunk positions (each chunk's scores, maximum, sum of exponentials and weighted
// values, then the chunks combined in order): a decode step splits one query's chunks among the threads, a prefill
// splits the queries, and both compute the same numbers.

#include "attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vector_math.h"

namespace d3 {

namespace {

#ifdef D3_VECTORS
#if defined(D3_AVX512)
inline FloatVector load_cache(const Cache* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#else
inline FloatVector load_cache(const Cache* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

// Rows of keys and values are read one after another: fetched kAhead rows early, as the weights' tiles are.
constexpr int64_t kAhead = 8;

inline void prefetch_row(const Cache* row, int vectors) {
  for (int64_t byte = 0; byte < vectors * kLanes * static_cast<int64_t>(sizeof(Cache)); byte += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(row) + byte, _MM_HINT_T0);
  }
}

// scores[g][j − start] = query_g · key_j · scaling for the query heads of one key/value head (−inf where masked):
// each key is loaded once for all of them. kVectors = head_dim / kLanes whole vectors, then `tail` (head_dim mod
// kLanes, e.g. 4 of a head of 100) one element at a time.
template <int kVectors, typename KeyAt>
void vector_scores(const float* const* queries, int64_t groups, int64_t start, int64_t stop, const bool* row,
                   float scaling, int64_t tail, KeyAt key_at, float* scores) {
  constexpr int64_t kWhole = kVectors * kLanes;
  for (int64_t j = start; j < stop; ++j) {
    if (row != nullptr && !row[j]) {
      for (int64_t g = 0; g < groups; ++g) scores[g * kChunk + j - start] = -std::numeric_limits<float>::infinity();
      continue;
    }
    const Cache* key = key_at(j);
    prefetch_row(key_at(std::min(j + kAhead, stop - 1)), kVectors + (tail > 0));
    FloatVector k[kVectors];
    for (int i = 0; i < kVectors; ++i) k[i] = load_cache(key + i * kLanes);
    for (int64_t g = 0; g < groups; ++g) {
      FloatVector sums = mul(load_floats(queries[g]), k[0]);
      for (int i = 1; i < kVectors; ++i) sums = fma(load_floats(queries[g] + i * kLanes), k[i], sums);
      float total = sum_all(sums);
      for (int64_t i = 0; i < tail; ++i) total = std::fma(queries[g][kWhole + i], to_float(key[kWhole + i]), total);
      scores[g * kChunk + j - start] = total * scaling;
    }
  }
}

// weighted_g += Σ_j weights[g][j]·value_j: each value is loaded once for all query heads (the `tail` as above).
template <int kVectors, typename ValueAt>
void vector_values(Partial* const* partials, int64_t groups, int64_t start, int64_t stop, const bool* row,
                   int64_t tail, ValueAt value_at, const float* weights) {
  constexpr int64_t kWhole = kVectors * kLanes;
  for (int64_t j = start; j < stop; ++j) {
    if (row != nullptr && !row[j]) continue;
    const Cache* value = value_at(j);
    prefetch_row(value_at(std::min(j + kAhead, stop - 1)), kVectors + (tail > 0));
    FloatVector v[kVectors];
    for (int i = 0; i < kVectors; ++i) v[i] = load_cache(value + i * kLanes);
    for (int64_t g = 0; g < groups; ++g) {
      const float weight = weights[g * kChunk + j - start];
      const FloatVector w = broadcast(weight);
      float* out = partials[g]->weighted;
      for (int i = 0; i < kVectors; ++i) store(out + i * kLanes, fma(w, v[i], load_floats(out + i * kLanes)));
      for (int64_t i = 0; i < tail; ++i) out[kWhole + i] = std::fma(weight, to_float(value[kWhole + i]), out[kWhole + i]);
    }
  }
}
#endif

// The whole vectors a head takes that have a vector path (head_dim / kLanes): every head size from one vector to 16,
// the rest past them one element at a time (a head of 100: 6 vectors and 4 elements on AVX-512, 12 and 4 on AVX2).
#define D3_HEAD_VECTORS                                                                                        \
  D3_CASE(1) D3_CASE(2) D3_CASE(3) D3_CASE(4) D3_CASE(5) D3_CASE(6) D3_CASE(7) D3_CASE(8) D3_CASE(9) D3_CASE(10) \
  D3_CASE(11) D3_CASE(12) D3_CASE(13) D3_CASE(14) D3_CASE(15) D3_CASE(16)

#ifdef D3_VECTORS
// Runs `run.template operator()<n>()` with n = head_dim / kLanes where a vector path exists (the one switch both the
// scores and the values pass through); false where none does, and the caller goes one element at a time.
template <typename Run>
bool with_head_vectors(int64_t head_dim, Run&& run) {
  switch (head_dim / kLanes) {
#define D3_CASE(n)                \
  case n:                         \
    run.template operator()<n>(); \
    return true;
    D3_HEAD_VECTORS
#undef D3_CASE
    default:
      return false;
  }
}
#endif

// The same one element at a time, for heads smaller than a vector or without a vector path.
inline float cache_dot(const float* query, const Cache* key, int64_t size) {
  float total = 0.f;
  for (int64_t i = 0; i < size; ++i) total = std::fma(query[i], to_float(key[i]), total);
  return total;
}

inline void add_scaled_cache(float* out, const Cache* value, float weight, int64_t size) {
  for (int64_t i = 0; i < size; ++i) out[i] = std::fma(weight, to_float(value[i]), out[i]);
}

// The chunk [start, stop) of the positions the query heads `queries` of one key/value head see (`row`: the mask's
// row, or null for all of them), into `partials` (one a query head); `scores` holds groups × kChunk floats.
template <typename KeyAt, typename ValueAt>
void attend_chunk(const float* const* queries, Partial* const* partials, int64_t groups, int64_t start, int64_t stop,
                  const bool* row, float scaling, int64_t head_dim, KeyAt key_at, ValueAt value_at, float* scores) {
  bool done = false;
#ifdef D3_VECTORS
  const int64_t tail = head_dim % kLanes;
  done = with_head_vectors(head_dim, [&]<int kVectors>() {
    vector_scores<kVectors>(queries, groups, start, stop, row, scaling, tail, key_at, scores);
  });
#endif
  if (!done) {
    for (int64_t j = start; j < stop; ++j) {
      for (int64_t g = 0; g < groups; ++g) {
        scores[g * kChunk + j - start] = row != nullptr && !row[j] ? -std::numeric_limits<float>::infinity()
                                                                   : cache_dot(queries[g], key_at(j), head_dim) * scaling;
      }
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    float* own = scores + g * kChunk;
    const int64_t count = stop - start;
    const float largest = largest_of(own, count);
    Partial& partial = *partials[g];
    std::fill(partial.weighted, partial.weighted + head_dim, 0.f);
    partial.largest = largest;
    partial.total = 0.f;
    if (largest == -std::numeric_limits<float>::infinity()) {
      std::fill(own, own + count, 0.f);
      continue;
    }
    exp_shifted(own, count, largest);  // masked positions: exp(−inf) = 0
    // summed over the whole chunk, zeros past the visible positions: the same additions in the same order for a
    // query whether later positions exist (a forward over a longer sequence) or not (a prefill, a decode step)
    std::fill(own + count, own + kChunk, 0.f);
    partial.total = total_of(own, kChunk);
  }
  done = false;
#ifdef D3_VECTORS
  done = with_head_vectors(head_dim, [&]<int kVectors>() {
    vector_values<kVectors>(partials, groups, start, stop, row, tail, value_at, scores);
  });
#endif
  if (!done) {
    for (int64_t j = start; j < stop; ++j) {
      if (row != nullptr && !row[j]) continue;
      for (int64_t g = 0; g < groups; ++g) {
        add_scaled_cache(partials[g]->weighted, value_at(j), scores[g * kChunk + j - start], head_dim);
      }
    }
  }
}

// The chunks' shares combined in order: softmax(scores)·values.
void combine(const Partial* partials, int64_t chunks, int64_t head_dim, float* out) {
  float largest = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < chunks; ++c) largest = std::max(largest, partials[c].largest);
  std::fill(out, out + head_dim, 0.f);
  if (largest == -std::numeric_limits<float>::infinity()) return;  // nothing visible (a padded row)
  float total = 0.f;
  for (int64_t c = 0; c < chunks; ++c) {
    if (partials[c].largest == -std::numeric_limits<float>::infinity()) continue;
    const float factor = exp1(partials[c].largest - largest);
    total = std::fma(partials[c].total, factor, total);
    add_scaled(out, partials[c].weighted, factor, head_dim);
  }
  const float inverse = 1.f / total;
  for (int64_t i = 0; i < head_dim; ++i) out[i] *= inverse;
}

// A thread's buffers for attend_chunk: one chunk's scores, and the query heads of one key/value head with their slots.
struct ChunkWork {
  std::vector<float> scores;
  std::vector<const float*> queries;
  std::vector<Partial*> partials;

  explicit ChunkWork(int64_t groups) : scores(groups * kChunk), queries(groups), partials(groups) {}
};

// Chunk c of the positions row m sees, for the query heads of key/value head kv, into slot(g) (g: the query head's
// place among them).
template <typename Slot>
void attend_chunk_of(const AttentionCall& a, int64_t m, int64_t kv, int64_t c, Slot slot, ChunkWork& work) {
  const int64_t groups = a.heads / a.kv_heads, positions = a.past + a.T;
  const int64_t visible = a.allowed != nullptr ? positions : a.past + m % a.T + 1;
  const int64_t b = m / a.T, start = c * kChunk, stop = std::min(start + kChunk, visible);
  auto key_at = [&](int64_t j) { return a.keys + b * a.k0 + kv * a.k1 + j * a.k2; };
  auto value_at = [&](int64_t j) { return a.values + b * a.v0 + kv * a.v1 + j * a.v2; };
  if (start >= stop) {
    for (int64_t g = 0; g < groups; ++g) {
      slot(g).largest = -std::numeric_limits<float>::infinity();
      slot(g).total = 0.f;
    }
    return;
  }
  for (int64_t g = 0; g < groups; ++g) {
    work.queries[g] = a.queries + m * a.query_stride + (kv * groups + g) * a.head_dim;
    work.partials[g] = &slot(g);
  }
  const bool* row = a.allowed != nullptr ? a.allowed + m * positions : nullptr;
  attend_chunk(work.queries.data(), work.partials.data(), groups, start, stop, row, a.scaling, a.head_dim, key_at,
               value_at, work.scores.data());
}

// Few queries (a decode step): the threads split the chunks of all of them, meet, then split the combining.
void attend_by_chunk(const AttentionCall& a, Partial* partials, float* out, int thread, int count, ChunkWork& work) {
  const int64_t groups = a.heads / a.kv_heads, chunks = attention_chunks(a.past + a.T);
  int64_t begin, end;
  thread_tiles(a.M * a.kv_heads * chunks, thread, count, begin, end);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t m = item / (a.kv_heads * chunks), kv = item / chunks % a.kv_heads, c = item % chunks;
    auto slot = [&](int64_t g) -> Partial& { return partials[(m * a.heads + kv * groups + g) * chunks + c]; };
    attend_chunk_of(a, m, kv, c, slot, work);
  }
#pragma omp barrier
  thread_tiles(a.M * a.heads, thread, count, begin, end);
  for (int64_t item = begin; item < end; ++item) {
    combine(partials + item * chunks, chunks, a.head_dim, out + item * a.head_dim);
  }
}

// Many queries (a prefill): the threads split the rows' key/value heads, each taking all their chunks in its own slots.
void attend_by_query(const AttentionCall& a, Partial* partials, float* out, int thread, int count, ChunkWork& work) {
  const int64_t groups = a.heads / a.kv_heads, chunks = attention_chunks(a.past + a.T);
  Partial* mine = partials + thread * groups * chunks;  // [chunks][groups]
  std::vector<Partial> ordered(chunks);
  int64_t begin, end;
  thread_tiles(a.M * a.kv_heads, thread, count, begin, end);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t m = item / a.kv_heads, kv = item % a.kv_heads;
    for (int64_t c = 0; c < chunks; ++c) {
      attend_chunk_of(a, m, kv, c, [&](int64_t g) -> Partial& { return mine[c * groups + g]; }, work);
    }
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t c = 0; c < chunks; ++c) ordered[c] = mine[c * groups + g];
      combine(ordered.data(), chunks, a.head_dim, out + (m * a.heads + kv * groups + g) * a.head_dim);
    }
  }
}

}  // namespace

void attend_cache(const AttentionCall& call, Partial* partials, float* out, int thread, int count) {
  ChunkWork work(call.heads / call.kv_heads);
  if (attention_by_chunk(call.M, call.kv_heads, count)) {
    attend_by_chunk(call, partials, out, thread, count, work);
  } else {
    attend_by_query(call, partials, out, thread, count, work);
  }
}

}  // namespace d3
