// Decoder layers of the Llama family (Llama, Mistral, Qwen2, Qwen3) with quantized projections, a layer per call or
// a run of layers per call.
//
//   torch.classes.d3.LayerWeights(parts, layout, numbers, input_norm [D], post_norm [D], q_norm [hd]?, k_norm [hd]?)
//       one layer's weights, checked once (layout: [heads, kv_heads, head_dim, intermediate, parts of qkv, of o,
//       of gate_up, of down, then (kind, group_size, rows) per part]; parts: (tiles, scale, offset?, bias?) per part;
//       numbers: [input norm eps, post norm eps, q/k norm eps, attention scaling])
//   torch.ops.d3.decoder_layer(hidden [B, T, D], key_buffer [B, Hkv, C, hd] float16, value_buffer, past, mask [B, 1, T,
//       past + T] bool or None (causal), cos [B, T, hd], sin, weights) -> hidden out [B, T, D]
//   torch.ops.d3.decoder_layers(hidden, key_buffers, value_buffers, pasts, cos, sin, weights) -> hidden out
//       the layers one after another (causal, no mask): a decode step's run of kept layers in one call
//
// A layer computes what fused_layers.FusedDecoderLayer computes (RMSNorm, QKV projection, Qwen3's per-head norms,
// rotary embedding, attention over the past and new positions, output projection, RMSNorm, gated SiLU MLP,
// residuals), every row of every token by the same operations whatever the batch, the number of tokens, of layers
// in the call or of threads: a prefill and the decode steps after it give what one forward over the whole sequence
// gives, to the last bit. The cache is the caller's: the buffers hold the past keys and values in their first
// `past` positions, and this writes the new ones behind them (the caller makes room first).
//
// Attention works in chunks of kChunk positions (each chunk's scores, maximum, sum of exponentials and weighted
// values, then the chunks combined in order): a decode step splits one query's chunks among the threads, a prefill
// splits the queries, and both compute the same numbers.
//
// All threads run the whole call in one parallel region, splitting each stage's work and meeting at a barrier
// between stages (a decode step is too short to start threads once per product, or once per layer).

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <omp.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "linear.h"
#include "vector_math.h"

namespace d3 {

namespace {

struct Projections {
  std::vector<Part> qkv, o, gate_up, down;
};

int64_t outputs(const std::vector<Part>& parts) {
  int64_t total = 0;
  for (const Part& part : parts) total += part.rows;
  return total;
}

Projections read_parts(const c10::List<std::optional<at::Tensor>>& tensors, c10::ArrayRef<int64_t> layout) {
  Projections projections;
  std::vector<Part>* lists[4] = {&projections.qkv, &projections.o, &projections.gate_up, &projections.down};
  int64_t part = 0;
  for (int p = 0; p < 4; ++p) {
    for (int64_t i = 0; i < layout[4 + p]; ++i, ++part) {
      TORCH_CHECK(static_cast<int64_t>(tensors.size()) >= 4 * (part + 1), "too few part tensors");
      auto get = [&](int64_t index) {
        const std::optional<at::Tensor> value = tensors.get(index);
        return value.has_value() ? *value : at::Tensor();
      };
      lists[p]->push_back(Part{layout[8 + 3 * part], layout[9 + 3 * part], layout[10 + 3 * part], get(4 * part),
                               get(4 * part + 1), get(4 * part + 2), get(4 * part + 3)});
    }
  }
  return projections;
}

// transformers' RMSNorm in float32: x·rsqrt(mean(x²) + eps), then the weight
void rms_norm(const float* x, const float* weight, int64_t size, float eps, float* out) {
  float squares = 0.f;
  for (int64_t i = 0; i < size; ++i) squares = std::fma(x[i], x[i], squares);
  const float inverse = 1.f / std::sqrt(squares / static_cast<float>(size) + eps);
  for (int64_t i = 0; i < size; ++i) out[i] = weight[i] * (x[i] * inverse);
}

// x·cos + rotate_half(x)·sin, rotate_half(x) = (−x₂, x₁)
void rotate(float* x, const float* cos, const float* sin, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  float rotated[1024];
  for (int64_t i = 0; i < half; ++i) {
    rotated[i] = -x[i + half];
    rotated[i + half] = x[i];
  }
  for (int64_t i = 0; i < head_dim; ++i) x[i] = x[i] * cos[i] + rotated[i] * sin[i];
}

// An even share of `count` items for this thread.
inline void share(int64_t count, int thread, int threads, int64_t& begin, int64_t& end) {
  const int64_t per = count / threads, extra = count % threads;
  begin = thread * per + std::min<int64_t>(thread, extra);
  end = begin + per + (thread < extra ? 1 : 0);
}

constexpr int64_t kChunk = 64;  // attention positions per chunk

// One chunk's share of attention for one query: the largest score, the sum of exp(score − largest) and the values
// weighted by them ([head_dim]); largest = −inf when no position of the chunk is visible.
struct Partial {
  float largest;
  float total;
  float* weighted;
};

// The key/value cache holds float16 (as llama.cpp's does): half the bytes a step reads at long contexts. A key or
// value is rounded to float16 once, when written, and every read (this step's or a later one's) sees that value.
using Cache = c10::Half;

inline Cache to_cache(float value) {  // saturating: a value beyond float16's range becomes its largest, not inf
  return Cache(std::min(std::max(value, -65504.f), 65504.f));
}

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
  switch (head_dim / kLanes) {
#define D3_CASE(n)                                                                            \
  case n:                                                                                     \
    vector_scores<n>(queries, groups, start, stop, row, scaling, tail, key_at, scores);      \
    done = true;                                                                              \
    break;
    D3_HEAD_VECTORS
#undef D3_CASE
    default:
      break;
  }
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
  switch (head_dim / kLanes) {
#define D3_CASE(n)                                                                            \
  case n:                                                                                     \
    vector_values<n>(partials, groups, start, stop, row, tail, value_at, scores);            \
    done = true;                                                                              \
    break;
    D3_HEAD_VECTORS
#undef D3_CASE
    default:
      break;
  }
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

// One layer's weights and shapes, checked once.
struct LayerWeights : torch::CustomClassHolder {
  Projections projections;
  at::Tensor input_norm, post_norm, q_norm, k_norm;  // q_norm, k_norm: undefined unless Qwen3
  int64_t heads, kv_heads, head_dim, intermediate, hidden_size;
  float input_eps, post_eps, qk_eps, scaling;

  LayerWeights(c10::List<std::optional<at::Tensor>> parts, std::vector<int64_t> layout, std::vector<double> numbers,
               at::Tensor input_norm_, at::Tensor post_norm_, std::optional<at::Tensor> q_norm_,
               std::optional<at::Tensor> k_norm_) {
    TORCH_CHECK(layout.size() >= 8 && numbers.size() == 4, "bad layout or numbers");
    heads = layout[0], kv_heads = layout[1], head_dim = layout[2], intermediate = layout[3];
    projections = read_parts(parts, layout);
    TORCH_CHECK(head_dim % 2 == 0 && head_dim <= 1024 && heads % kv_heads == 0, "unsupported head layout");
    input_norm = input_norm_.contiguous(), post_norm = post_norm_.contiguous();
    hidden_size = input_norm.numel();
    for (const at::Tensor* norm : {&input_norm, &post_norm}) {
      TORCH_CHECK(norm->scalar_type() == at::kFloat && norm->numel() == hidden_size, "norms are float32 [D]");
    }
    if (q_norm_.has_value() || k_norm_.has_value()) {
      TORCH_CHECK(q_norm_.has_value() && k_norm_.has_value(), "q_norm and k_norm come together");
      q_norm = q_norm_->contiguous(), k_norm = k_norm_->contiguous();
      TORCH_CHECK(q_norm.scalar_type() == at::kFloat && q_norm.numel() == head_dim && k_norm.numel() == head_dim &&
                      k_norm.scalar_type() == at::kFloat, "q/k norms are float32 [head_dim]");
    }
    const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim;
    TORCH_CHECK(outputs(projections.qkv) == q_size + 2 * kv_size && outputs(projections.o) == hidden_size &&
                    outputs(projections.gate_up) == 2 * intermediate && outputs(projections.down) == hidden_size,
                "the projections do not match the layout");
    for (const Part& part : projections.qkv) check_part(part, hidden_size);
    for (const Part& part : projections.o) check_part(part, q_size);
    for (const Part& part : projections.gate_up) check_part(part, hidden_size);
    for (const Part& part : projections.down) check_part(part, intermediate);
    input_eps = static_cast<float>(numbers[0]), post_eps = static_cast<float>(numbers[1]);
    qk_eps = static_cast<float>(numbers[2]), scaling = static_cast<float>(numbers[3]);
  }
};

// One call of a layer: its key/value buffers and how many positions they held before it.
struct LayerCall {
  const LayerWeights* weights;
  Cache* keys;
  Cache* values;
  int64_t k0, k1, k2, v0, v1, v2;  // the buffers' strides
  int64_t past;
};

LayerCall make_call(const LayerWeights& weights, const at::Tensor& key_buffer, const at::Tensor& value_buffer,
                    int64_t past, int64_t B, int64_t T) {
  for (const at::Tensor* buffer : {&key_buffer, &value_buffer}) {
    TORCH_CHECK(buffer->scalar_type() == at::kHalf && buffer->dim() == 4 && buffer->size(0) == B &&
                    buffer->size(1) == weights.kv_heads && buffer->size(2) >= past + T &&
                    buffer->size(3) == weights.head_dim && buffer->stride(3) == 1,
                "the key and value buffers must be float16 [B, kv_heads, >= past + T, head_dim] with contiguous rows");
  }
  TORCH_CHECK(past >= 0, "past must not be negative");
  return {&weights, key_buffer.data_ptr<Cache>(), value_buffer.data_ptr<Cache>(), key_buffer.stride(0),
          key_buffer.stride(1), key_buffer.stride(2), value_buffer.stride(0), value_buffer.stride(1),
          value_buffer.stride(2), past};
}

// Buffers reused from call to call by the thread that calls the operator.
struct Scratch {
  std::vector<float> normed, qkv, attended, middle, gate_up, partial_values;
  std::vector<Partial> partials;
  QuantizedRows rows_d, rows_q, rows_i;
};

// The rows, tokens and positions of one call, with the scratch buffers sized for its largest layer.
struct CallShape {
  int64_t B, T, M;
  const bool* allowed;  // the mask [B, T, positions] or null (causal)
  const float* cos;
  const float* sin;
};

void size_scratch(Scratch& s, const std::vector<LayerCall>& calls, const CallShape& shape, int threads) {
  int64_t normed = 0, qkv = 0, attended = 0, middle = 0, gate_up = 0, slots = 0, slot_values = 0;
  int64_t d = 0, q = 0, i = 0;
  for (const LayerCall& call : calls) {
    const LayerWeights& w = *call.weights;
    const int64_t q_size = w.heads * w.head_dim, positions = call.past + shape.T;
    const int64_t chunks = (positions + kChunk - 1) / kChunk;
    const bool by_chunk = shape.M * w.kv_heads < 4 * threads;
    const int64_t partial_slots = by_chunk ? shape.M * w.heads * chunks : threads * (w.heads / w.kv_heads) * chunks;
    normed = std::max(normed, shape.M * std::max(w.hidden_size, w.intermediate));
    qkv = std::max(qkv, shape.M * (q_size + 2 * w.kv_heads * w.head_dim));
    attended = std::max(attended, shape.M * q_size);
    middle = std::max(middle, shape.M * w.hidden_size);
    gate_up = std::max(gate_up, shape.M * 2 * w.intermediate);
    slots = std::max(slots, partial_slots);
    slot_values = std::max(slot_values, partial_slots * w.head_dim);
    d = std::max(d, w.hidden_size), q = std::max(q, q_size), i = std::max(i, w.intermediate);
  }
  s.normed.resize(normed), s.qkv.resize(qkv), s.attended.resize(attended), s.middle.resize(middle);
  s.gate_up.resize(gate_up), s.partial_values.resize(slot_values), s.partials.resize(slots);
  s.rows_d.resize(shape.M, d), s.rows_q.resize(shape.M, q), s.rows_i.resize(shape.M, i);
  const int64_t head_dim = calls.front().weights->head_dim;  // the same in every layer of a call
  for (int64_t slot = 0; slot < slots; ++slot) s.partials[slot].weighted = s.partial_values.data() + slot * head_dim;
}

// One layer, run by every thread of the team (`thread` of `count`): x [M, D] in, y [M, D] out.
void run_layer(const LayerCall& call, const CallShape& shape, const float* x, float* y, Scratch& s, int thread,
               int count) {
  const LayerWeights& w = *call.weights;
  const Projections& projections = w.projections;
  const int64_t T = shape.T, M = shape.M, D = w.hidden_size, heads = w.heads, kv_heads = w.kv_heads;
  const int64_t head_dim = w.head_dim, intermediate = w.intermediate, past = call.past, positions = past + T;
  const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim, qkv_size = q_size + 2 * kv_size;
  const int64_t groups = heads / kv_heads, chunks = (positions + kChunk - 1) / kChunk;
  const bool by_chunk = M * kv_heads < 4 * count;
  const bool* allowed = shape.allowed;
  Cache* keys = call.keys;
  Cache* values = call.values;
  const float* q_weight = w.q_norm.defined() ? w.q_norm.data_ptr<float>() : nullptr;
  const float* k_weight = w.k_norm.defined() ? w.k_norm.data_ptr<float>() : nullptr;
  int64_t begin, end;
  std::vector<float> scores(groups * kChunk);
  std::vector<const float*> queries(groups);
  std::vector<Partial*> partials(groups);
  // 1. input norm, quantized
  share(M, thread, count, begin, end);
  for (int64_t m = begin; m < end; ++m) {
    rms_norm(x + m * D, w.input_norm.data_ptr<float>(), D, w.input_eps, s.normed.data() + m * D);
  }
  s.rows_d.quantize(s.normed.data(), D, begin, end);
#pragma omp barrier
  // 2. query, key and value projections
  projection_rows(projections.qkv, s.rows_d, thread, count, s.qkv.data(), qkv_size);
#pragma omp barrier
  // 3. per-head norms and rotary embedding of queries and keys; new keys and values into the buffers
  share(M * (heads + kv_heads), thread, count, begin, end);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t m = item / (heads + kv_heads), head = item % (heads + kv_heads);
    float* state = s.qkv.data() + m * qkv_size + head * head_dim;  // a query head, then the key heads
    const float* norm_weight = head < heads ? q_weight : k_weight;
    if (norm_weight != nullptr) rms_norm(state, norm_weight, head_dim, w.qk_eps, state);
    rotate(state, shape.cos + m * head_dim, shape.sin + m * head_dim, head_dim);
    if (head >= heads) {
      const int64_t b = m / T, position = past + m % T, kv = head - heads;
      Cache* key = keys + b * call.k0 + kv * call.k1 + position * call.k2;
      Cache* value = values + b * call.v0 + kv * call.v1 + position * call.v2;
      const float* v = s.qkv.data() + m * qkv_size + q_size + kv_size + kv * head_dim;
      for (int64_t i = 0; i < head_dim; ++i) key[i] = to_cache(state[i]), value[i] = to_cache(v[i]);
    }
  }
#pragma omp barrier
  // 4. attention: each query head over the positions it may see, in chunks
  auto query_of = [&](int64_t m, int64_t head) { return s.qkv.data() + m * qkv_size + head * head_dim; };
  auto visible_of = [&](int64_t m) { return allowed != nullptr ? positions : past + m % T + 1; };
  auto row_of = [&](int64_t m) { return allowed != nullptr ? allowed + m * positions : nullptr; };
  auto attend = [&](int64_t m, int64_t kv, int64_t c, auto slot /* g -> Partial& */) {
    const int64_t b = m / T, start = c * kChunk, stop = std::min(start + kChunk, visible_of(m));
    auto key_at = [&](int64_t j) { return keys + b * call.k0 + kv * call.k1 + j * call.k2; };
    auto value_at = [&](int64_t j) { return values + b * call.v0 + kv * call.v1 + j * call.v2; };
    if (start >= stop) {
      for (int64_t g = 0; g < groups; ++g) {
        slot(g).largest = -std::numeric_limits<float>::infinity();
        slot(g).total = 0.f;
      }
      return;
    }
    for (int64_t g = 0; g < groups; ++g) {
      queries[g] = query_of(m, kv * groups + g);
      partials[g] = &slot(g);
    }
    attend_chunk(queries.data(), partials.data(), groups, start, stop, row_of(m), w.scaling, head_dim, key_at,
                 value_at, scores.data());
  };
  if (by_chunk) {
    share(M * kv_heads * chunks, thread, count, begin, end);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t m = item / (kv_heads * chunks), kv = item / chunks % kv_heads, c = item % chunks;
      attend(m, kv, c, [&](int64_t g) -> Partial& { return s.partials[(m * heads + kv * groups + g) * chunks + c]; });
    }
#pragma omp barrier
    share(M * heads, thread, count, begin, end);
    for (int64_t item = begin; item < end; ++item) {
      combine(s.partials.data() + item * chunks, chunks, head_dim, s.attended.data() + item * head_dim);
    }
  } else {
    Partial* mine = s.partials.data() + thread * groups * chunks;  // [chunks][groups]
    std::vector<Partial> ordered(chunks);
    share(M * kv_heads, thread, count, begin, end);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t m = item / kv_heads, kv = item % kv_heads;
      for (int64_t c = 0; c < chunks; ++c) attend(m, kv, c, [&](int64_t g) -> Partial& { return mine[c * groups + g]; });
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t c = 0; c < chunks; ++c) ordered[c] = mine[c * groups + g];
        combine(ordered.data(), chunks, head_dim, s.attended.data() + (m * heads + kv * groups + g) * head_dim);
      }
    }
  }
#pragma omp barrier
  // 5. output projection and the residual
  share(M, thread, count, begin, end);
  s.rows_q.quantize(s.attended.data(), q_size, begin, end);
#pragma omp barrier
  projection_rows(projections.o, s.rows_q, thread, count, s.middle.data(), D);
#pragma omp barrier
  share(M, thread, count, begin, end);
  for (int64_t m = begin; m < end; ++m) {
    for (int64_t i = 0; i < D; ++i) s.middle[m * D + i] += x[m * D + i];
    rms_norm(s.middle.data() + m * D, w.post_norm.data_ptr<float>(), D, w.post_eps, s.normed.data() + m * D);
  }
  s.rows_d.quantize(s.normed.data(), D, begin, end);
#pragma omp barrier
  // 6. gated SiLU MLP and the residual
  projection_rows(projections.gate_up, s.rows_d, thread, count, s.gate_up.data(), 2 * intermediate);
#pragma omp barrier
  for (int64_t m = begin; m < end; ++m) {
    const float* gate = s.gate_up.data() + m * 2 * intermediate;
    silu_times(gate, gate + intermediate, intermediate, s.normed.data() + m * intermediate);
  }
  s.rows_i.quantize(s.normed.data(), intermediate, begin, end);
#pragma omp barrier
  projection_rows(projections.down, s.rows_i, thread, count, y, D);
#pragma omp barrier
  for (int64_t m = begin; m < end; ++m) {
    for (int64_t i = 0; i < D; ++i) y[m * D + i] += s.middle[m * D + i];
  }
#pragma omp barrier
}

CallShape call_shape(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim,
                     int64_t hidden_size) {
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && hidden.dim() == 3 && hidden.is_contiguous() &&
                  hidden.size(2) == hidden_size, "hidden must be a contiguous float32 [B, T, D] tensor");
  const int64_t B = hidden.size(0), T = hidden.size(1), M = B * T;
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && cos.numel() == M * head_dim &&
                  sin.scalar_type() == at::kFloat && sin.is_contiguous() && sin.numel() == M * head_dim,
              "cos and sin must be contiguous float32 [B, T, head_dim]");
  return {B, T, M, nullptr, cos.data_ptr<float>(), sin.data_ptr<float>()};
}

// The layers of `calls` one after another on x (M × D), the result in `out`.
void run_layers(const std::vector<LayerCall>& calls, CallShape shape, const float* x, float* out) {
  thread_local Scratch own;
  Scratch& scratch = own;  // the calling thread's: inside the parallel region `own` would name each thread's own
  const int threads = threads_to_use();
  size_scratch(scratch, calls, shape, threads);
  const int64_t size = shape.M * calls.front().weights->hidden_size;
  std::vector<float> between(calls.size() > 1 ? size : 0);
#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num(), count = omp_get_num_threads();
    for (size_t l = 0; l < calls.size(); ++l) {
      // the last layer writes `out`; the ones before alternate between `out` and `between`
      const size_t remaining = calls.size() - 1 - l;
      float* y = remaining % 2 == 0 ? out : between.data();
      const float* in = l == 0 ? x : (remaining % 2 == 0 ? between.data() : out);
      run_layer(calls[l], shape, in, y, scratch, thread, count);
    }
  }
}

at::Tensor decoder_layer(const at::Tensor& hidden, const at::Tensor& key_buffer, const at::Tensor& value_buffer,
                         int64_t past, const std::optional<at::Tensor>& mask, const at::Tensor& cos,
                         const at::Tensor& sin, const c10::intrusive_ptr<LayerWeights>& weights) {
  CallShape shape = call_shape(hidden, cos, sin, weights->head_dim, weights->hidden_size);
  const std::vector<LayerCall> calls{make_call(*weights, key_buffer, value_buffer, past, shape.B, shape.T)};
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() &&
                    mask->numel() == shape.M * (past + shape.T),
                "the mask must be a contiguous bool [B, 1, T, past + T] tensor");
    shape.allowed = mask->data_ptr<bool>();
  }
  at::Tensor out = at::empty_like(hidden);
  run_layers(calls, shape, hidden.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

at::Tensor decoder_layers(const at::Tensor& hidden, const std::vector<at::Tensor>& key_buffers,
                          const std::vector<at::Tensor>& value_buffers, c10::IntArrayRef pasts, const at::Tensor& cos,
                          const at::Tensor& sin, const std::vector<c10::intrusive_ptr<LayerWeights>>& weights) {
  TORCH_CHECK(!weights.empty() && key_buffers.size() == weights.size() && value_buffers.size() == weights.size() &&
                  pasts.size() == weights.size(), "one key buffer, value buffer and past per layer");
  const CallShape shape = call_shape(hidden, cos, sin, weights.front()->head_dim, weights.front()->hidden_size);
  std::vector<LayerCall> calls;
  for (size_t l = 0; l < weights.size(); ++l) {
    const LayerWeights& first = *weights.front();
    TORCH_CHECK(weights[l]->hidden_size == first.hidden_size && weights[l]->head_dim == first.head_dim &&
                    weights[l]->heads == first.heads && weights[l]->kv_heads == first.kv_heads &&
                    weights[l]->intermediate == first.intermediate, "the layers of one call must have one shape");
    calls.push_back(make_call(*weights[l], key_buffers[l], value_buffers[l], pasts[l], shape.B, shape.T));
  }
  at::Tensor out = at::empty_like(hidden);
  run_layers(calls, shape, hidden.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

}  // namespace

}  // namespace d3

TORCH_LIBRARY_FRAGMENT(d3, m) {
  m.class_<d3::LayerWeights>("LayerWeights")
      .def(torch::init<c10::List<std::optional<at::Tensor>>, std::vector<int64_t>, std::vector<double>, at::Tensor,
                       at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>>());
  m.def(
      "decoder_layer(Tensor hidden, Tensor(a!) key_buffer, Tensor(b!) value_buffer, int past, Tensor? mask, "
      "Tensor cos, Tensor sin, __torch__.torch.classes.d3.LayerWeights weights) -> Tensor");
  m.def(
      "decoder_layers(Tensor hidden, Tensor(a!)[] key_buffers, Tensor(b!)[] value_buffers, int[] pasts, Tensor cos, "
      "Tensor sin, __torch__.torch.classes.d3.LayerWeights[] weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(d3, CPU, m) {
  m.impl("decoder_layer", &d3::decoder_layer);
  m.impl("decoder_layers", &d3::decoder_layers);
}
