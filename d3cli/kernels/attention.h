// A decoder layer's attention over its key/value cache (attention.cpp), as decoder_layer.cpp calls it: the cache's
// element type, the chunks attention works in, and the scratch slots it needs.

#pragma once

#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

namespace d3 {

// The key/value cache holds float16 (as llama.cpp's does): half the bytes a step reads at long contexts. A key or
// value is rounded to float16 once, when written, and every read (this step's or a later one's) sees that value.
using Cache = c10::Half;

inline Cache to_cache(float value) {  // saturating: a value beyond float16's range becomes its largest, not inf
  return Cache(std::min(std::max(value, -65504.f), 65504.f));
}

constexpr int64_t kChunk = 64;  // attention positions per chunk

// One chunk's share of attention for one query: the largest score, the sum of exp(score − largest) and the values
// weighted by them ([head_dim]); largest = −inf when no position of the chunk is visible.
struct Partial {
  float largest;
  float total;
  float* weighted;
};

// One layer call's attention: the query heads of its M = B·T rows (row m: token m % T of sequence m / T) over the
// first past + T positions of their sequence's keys and values (the new ones written already).
struct AttentionCall {
  const float* queries;  // row m's query heads side by side from queries + m·query_stride
  int64_t query_stride;
  const Cache* keys;  // [B, kv_heads, >= past + T, head_dim], strides k0, k1, k2 (rows contiguous)
  const Cache* values;  // the same, strides v0, v1, v2
  int64_t k0, k1, k2, v0, v1, v2;
  int64_t T, M, past, heads, kv_heads, head_dim;
  const bool* allowed;  // the mask [B, T, past + T] or null (causal)
  float scaling;
};

inline int64_t attention_chunks(int64_t positions) { return (positions + kChunk - 1) / kChunk; }

// Whether the threads split each query's chunks among them (a decode step: few queries) rather than the queries.
inline bool attention_by_chunk(int64_t M, int64_t kv_heads, int threads) { return M * kv_heads < 4 * threads; }

// The Partial slots (each with head_dim floats of its own) a call's attention takes from the scratch.
inline int64_t attention_slots(int64_t M, int64_t heads, int64_t kv_heads, int64_t positions, int threads) {
  const int64_t chunks = attention_chunks(positions);
  return attention_by_chunk(M, kv_heads, threads) ? M * heads * chunks : threads * (heads / kv_heads) * chunks;
}

// softmax(q·Kᵀ·scaling)·V for every query head of the call into out [M, heads·head_dim]: this thread's share of it.
// Every thread of the team calls it (they meet at a barrier inside); `partials` holds attention_slots(…, count) slots.
void attend_cache(const AttentionCall& call, Partial* partials, float* out, int thread, int count);

}  // namespace d3
