// One decoder layer of the Llama family (Llama, Mistral, Qwen2, Qwen3) with quantized projections, in one call.
//
//   torch.ops.d3.decoder_layer(hidden [B, T, D], key_buffer [B, Hkv, C, hd], value_buffer, past, mask [B, 1, T,
//                              past + T] bool or None (causal), cos [B, T, hd], sin, input_norm [D], post_norm [D],
//                              q_norm [hd]?, k_norm [hd]?, parts, layout, numbers) -> hidden out [B, T, D]
//
// It computes what fused_layers.FusedDecoderLayer computes (RMSNorm, QKV projection, Qwen3's per-head norms, rotary
// embedding, attention over the past and new positions, output projection, RMSNorm, gated SiLU MLP, residuals),
// every row of every token by the same operations whatever the batch, the number of tokens or threads: a prefill
// and the decode steps after it give what one forward over the whole sequence gives, to the last bit. The cache is
// the caller's: the buffers hold the past keys and values in their first `past` positions, and this writes the new
// ones behind them (the caller makes room first).
//
// Attention works in chunks of kChunk positions (each chunk's scores, maximum, sum of exponentials and weighted
// values, then the chunks combined in order): a decode step splits one query's chunks among the threads, a prefill
// splits the queries, and both compute the same numbers.
//
// All threads run the whole layer in one parallel region, splitting each stage's work and meeting at a barrier
// between stages (a decode step is too short to start threads once per product).
//
// layout: [heads, kv_heads, head_dim, intermediate, parts of qkv, of o, of gate_up, of down, then (kind,
// group_size, rows) per part]; parts: (tiles, scale, offset?, bias?) per part; numbers: [input norm eps, post norm
// eps, q/k norm eps, attention scaling].

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <omp.h>
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

// The chunk [start, stop) of the positions one query sees (`row`: the mask's row, or null for all up to `stop`).
template <typename KeyAt, typename ValueAt>
void attend_chunk(const float* query, int64_t start, int64_t stop, const bool* row, float scaling, int64_t head_dim,
                  KeyAt key_at, ValueAt value_at, float* scores, Partial& partial) {
  float largest = -std::numeric_limits<float>::infinity();
  for (int64_t j = start; j < stop; ++j) {
    if (row != nullptr && !row[j]) {
      scores[j - start] = -std::numeric_limits<float>::infinity();
      continue;
    }
    scores[j - start] = dot(query, key_at(j), head_dim) * scaling;
    largest = std::max(largest, scores[j - start]);
  }
  std::fill(partial.weighted, partial.weighted + head_dim, 0.f);
  partial.largest = largest;
  partial.total = 0.f;
  if (largest == -std::numeric_limits<float>::infinity()) return;
  exp_shifted(scores, stop - start, largest);
  for (int64_t j = start; j < stop; ++j) {
    if (row != nullptr && !row[j]) continue;
    partial.total += scores[j - start];
    add_scaled(partial.weighted, value_at(j), scores[j - start], head_dim);
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

// Buffers reused from call to call by the thread that calls the operator.
struct Scratch {
  std::vector<float> normed, qkv, attended, middle, gate_up, partial_values;
  std::vector<Partial> partials;
  QuantizedRows rows_d, rows_q, rows_i;
};

at::Tensor decoder_layer(const at::Tensor& hidden, const at::Tensor& key_buffer, const at::Tensor& value_buffer,
                         int64_t past, const std::optional<at::Tensor>& mask, const at::Tensor& cos,
                         const at::Tensor& sin, const at::Tensor& input_norm, const at::Tensor& post_norm,
                         const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                         const c10::List<std::optional<at::Tensor>>& part_tensors, c10::IntArrayRef layout,
                         c10::ArrayRef<double> numbers) {
  TORCH_CHECK(layout.size() >= 8 && numbers.size() == 4, "bad layout or numbers");
  const int64_t heads = layout[0], kv_heads = layout[1], head_dim = layout[2], intermediate = layout[3];
  const Projections projections = read_parts(part_tensors, layout);
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && hidden.dim() == 3 && hidden.is_contiguous(),
              "hidden must be a contiguous float32 [B, T, D] tensor");
  const int64_t B = hidden.size(0), T = hidden.size(1), D = hidden.size(2), M = B * T;
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= 1024 && heads % kv_heads == 0, "unsupported head layout");
  const int64_t positions = past + T;
  for (const at::Tensor* buffer : {&key_buffer, &value_buffer}) {
    TORCH_CHECK(buffer->scalar_type() == at::kFloat && buffer->dim() == 4 && buffer->size(0) == B &&
                    buffer->size(1) == kv_heads && buffer->size(2) >= positions && buffer->size(3) == head_dim &&
                    buffer->stride(3) == 1,
                "the key and value buffers must be float32 [B, kv_heads, >= past + T, head_dim] with contiguous rows");
  }
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && cos.numel() == M * head_dim &&
                  sin.scalar_type() == at::kFloat && sin.is_contiguous() && sin.numel() == M * head_dim,
              "cos and sin must be contiguous float32 [B, T, head_dim]");
  const bool* allowed = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->numel() == B * T * positions,
                "the mask must be a contiguous bool [B, 1, T, past + T] tensor");
    allowed = mask->data_ptr<bool>();
  }
  const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim;
  TORCH_CHECK(outputs(projections.qkv) == q_size + 2 * kv_size && outputs(projections.o) == D &&
                  outputs(projections.gate_up) == 2 * intermediate && outputs(projections.down) == D,
              "the projections do not match the layout");
  for (const Part& part : projections.qkv) check_part(part, D);
  for (const Part& part : projections.o) check_part(part, q_size);
  for (const Part& part : projections.gate_up) check_part(part, D);
  for (const Part& part : projections.down) check_part(part, intermediate);
  const float input_eps = static_cast<float>(numbers[0]), post_eps = static_cast<float>(numbers[1]);
  const float qk_eps = static_cast<float>(numbers[2]), scaling = static_cast<float>(numbers[3]);

  at::Tensor out = at::empty({B, T, D}, hidden.options());
  const int64_t qkv_size = q_size + 2 * kv_size, groups = heads / kv_heads;
  const int64_t chunks = (positions + kChunk - 1) / kChunk;
  const int threads = threads_to_use();
  // a decode step (few queries) splits each query's chunks among the threads; a prefill splits the queries
  const bool by_chunk = M * kv_heads < 4 * threads;
  thread_local Scratch scratch;
  Scratch& s = scratch;
  s.normed.resize(M * std::max(D, intermediate));
  s.qkv.resize(M * qkv_size);
  s.attended.resize(M * q_size);
  s.middle.resize(M * D);
  s.gate_up.resize(M * 2 * intermediate);
  const int64_t partial_slots = by_chunk ? M * heads * chunks : threads * groups * chunks;
  s.partial_values.resize(partial_slots * head_dim);
  s.partials.resize(partial_slots);
  for (int64_t i = 0; i < partial_slots; ++i) s.partials[i].weighted = s.partial_values.data() + i * head_dim;
  s.rows_d.resize(M, D);
  s.rows_q.resize(M, q_size);
  s.rows_i.resize(M, intermediate);
  const float* x = hidden.data_ptr<float>();
  float* y = out.data_ptr<float>();
  float* keys = key_buffer.data_ptr<float>();
  float* values = value_buffer.data_ptr<float>();
  const int64_t k0 = key_buffer.stride(0), k1 = key_buffer.stride(1), k2 = key_buffer.stride(2);
  const int64_t v0 = value_buffer.stride(0), v1 = value_buffer.stride(1), v2 = value_buffer.stride(2);
  const float* cos_ = cos.data_ptr<float>();
  const float* sin_ = sin.data_ptr<float>();
  const float* input_weight = input_norm.data_ptr<float>();
  const float* post_weight = post_norm.data_ptr<float>();
  const float* q_weight = q_norm.has_value() ? q_norm->data_ptr<float>() : nullptr;
  const float* k_weight = k_norm.has_value() ? k_norm->data_ptr<float>() : nullptr;

#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num(), count = omp_get_num_threads();
    int64_t begin, end;
    float scores[kChunk];
    // 1. input norm, quantized
    share(M, thread, count, begin, end);
    for (int64_t m = begin; m < end; ++m) rms_norm(x + m * D, input_weight, D, input_eps, s.normed.data() + m * D);
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
      if (norm_weight != nullptr) rms_norm(state, norm_weight, head_dim, qk_eps, state);
      rotate(state, cos_ + m * head_dim, sin_ + m * head_dim, head_dim);
      if (head >= heads) {
        const int64_t b = m / T, position = past + m % T, kv = head - heads;
        std::copy(state, state + head_dim, keys + b * k0 + kv * k1 + position * k2);
        const float* v = s.qkv.data() + m * qkv_size + q_size + kv_size + kv * head_dim;
        std::copy(v, v + head_dim, values + b * v0 + kv * v1 + position * v2);
      }
    }
#pragma omp barrier
    // 4. attention: each query head over the positions it may see, in chunks
    auto query_of = [&](int64_t m, int64_t head) { return s.qkv.data() + m * qkv_size + head * head_dim; };
    auto visible_of = [&](int64_t m) { return allowed != nullptr ? positions : past + m % T + 1; };
    auto row_of = [&](int64_t m) { return allowed != nullptr ? allowed + m * positions : nullptr; };
    auto attend = [&](int64_t m, int64_t kv, int64_t c, auto slot /* g -> Partial& */) {
      const int64_t b = m / T, start = c * kChunk, stop = std::min(start + kChunk, visible_of(m));
      auto key_at = [&](int64_t j) { return keys + b * k0 + kv * k1 + j * k2; };
      auto value_at = [&](int64_t j) { return values + b * v0 + kv * v1 + j * v2; };
      for (int64_t g = 0; g < groups; ++g) {
        Partial& partial = slot(g);
        if (start >= stop) {
          partial.largest = -std::numeric_limits<float>::infinity();
          partial.total = 0.f;
          continue;
        }
        attend_chunk(query_of(m, kv * groups + g), start, stop, row_of(m), scaling, head_dim, key_at, value_at,
                     scores, partial);
      }
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
      rms_norm(s.middle.data() + m * D, post_weight, D, post_eps, s.normed.data() + m * D);
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
  }
  return out;
}

}  // namespace

}  // namespace d3

TORCH_LIBRARY_FRAGMENT(d3, m) {
  m.def(
      "decoder_layer(Tensor hidden, Tensor(a!) key_buffer, Tensor(b!) value_buffer, int past, Tensor? mask, "
      "Tensor cos, Tensor sin, Tensor input_norm, Tensor post_norm, Tensor? q_norm, Tensor? k_norm, Tensor?[] parts, "
      "int[] layout, float[] numbers) -> Tensor");
}

TORCH_LIBRARY_IMPL(d3, CPU, m) { m.impl("decoder_layer", &d3::decoder_layer); }
