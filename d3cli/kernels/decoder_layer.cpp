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
// A layer is its attention half (attention_block: input norm, QKV projection, per-head norms and rotary embedding,
// the new keys and values into the cache, attention over it in attention.cpp, output projection, residual) and its
// MLP half (mlp_block: post-attention norm, gate/up projection, SiLU·up, down projection, residual).
//
// All threads run the whole call in one parallel region, splitting each stage's work and meeting at a barrier
// between stages (a decode step is too short to start threads once per product, or once per layer).

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <omp.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "attention.h"
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

// One layer's weights and shapes, checked once.
struct LayerWeights : torch::CustomClassHolder {
  Projections projections;
  at::Tensor input_norm, post_norm, q_norm, k_norm;  // q_norm, k_norm: undefined unless Qwen3
  int64_t heads, kv_heads, head_dim, intermediate, hidden_size;
  float input_eps, post_eps, qk_eps, scaling;

  int64_t q_size() const { return heads * head_dim; }
  int64_t kv_size() const { return kv_heads * head_dim; }
  int64_t qkv_size() const { return q_size() + 2 * kv_size(); }

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
    const int64_t q_size = w.q_size();
    const int64_t partial_slots = attention_slots(shape.M, w.heads, w.kv_heads, call.past + shape.T, threads);
    normed = std::max(normed, shape.M * std::max(w.hidden_size, w.intermediate));
    qkv = std::max(qkv, shape.M * w.qkv_size());
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

// Rows [begin, end) of `rows` (M × D) RMS-normed into s.normed, then quantized into s.rows_d for a projection.
void norm_rows(const float* rows, const at::Tensor& weight, float eps, int64_t D, Scratch& s, int64_t begin,
               int64_t end) {
  for (int64_t m = begin; m < end; ++m) {
    rms_norm(rows + m * D, weight.data_ptr<float>(), D, eps, s.normed.data() + m * D);
  }
  s.rows_d.quantize(s.normed.data(), D, begin, end);
}

// This thread's query and key heads normed (Qwen3's per-head norms) and rotated in s.qkv; the new keys and values
// rounded into the cache behind the `past` ones.
void rotate_and_cache(const LayerCall& call, const CallShape& shape, Scratch& s, int thread, int count) {
  const LayerWeights& w = *call.weights;
  const int64_t heads = w.heads, kv_heads = w.kv_heads, head_dim = w.head_dim;
  const int64_t q_size = w.q_size(), kv_size = w.kv_size(), qkv_size = w.qkv_size();
  const float* q_weight = w.q_norm.defined() ? w.q_norm.data_ptr<float>() : nullptr;
  const float* k_weight = w.k_norm.defined() ? w.k_norm.data_ptr<float>() : nullptr;
  int64_t begin, end;
  thread_tiles(shape.M * (heads + kv_heads), thread, count, begin, end);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t m = item / (heads + kv_heads), head = item % (heads + kv_heads);
    float* state = s.qkv.data() + m * qkv_size + head * head_dim;  // a query head, then the key heads
    const float* norm_weight = head < heads ? q_weight : k_weight;
    if (norm_weight != nullptr) rms_norm(state, norm_weight, head_dim, w.qk_eps, state);
    rotate(state, shape.cos + m * head_dim, shape.sin + m * head_dim, head_dim);
    if (head >= heads) {
      const int64_t b = m / shape.T, position = call.past + m % shape.T, kv = head - heads;
      Cache* key = call.keys + b * call.k0 + kv * call.k1 + position * call.k2;
      Cache* value = call.values + b * call.v0 + kv * call.v1 + position * call.v2;
      const float* v = s.qkv.data() + m * qkv_size + q_size + kv_size + kv * head_dim;
      for (int64_t i = 0; i < head_dim; ++i) key[i] = to_cache(state[i]), value[i] = to_cache(v[i]);
    }
  }
}

// Every query head of s.qkv over the positions it may see (attention.cpp), into s.attended.
void attend_heads(const LayerCall& call, const CallShape& shape, Scratch& s, int thread, int count) {
  const LayerWeights& w = *call.weights;
  const AttentionCall attention{s.qkv.data(), w.qkv_size(), call.keys, call.values, call.k0, call.k1, call.k2,
                                call.v0, call.v1, call.v2, shape.T, shape.M, call.past, w.heads, w.kv_heads,
                                w.head_dim, shape.allowed, w.scaling};
  attend_cache(attention, s.partials.data(), s.attended.data(), thread, count);
}

// s.middle = x + the output projection of s.attended.
void project_attention_output(const LayerWeights& w, const CallShape& shape, const float* x, Scratch& s, int thread,
                              int count) {
  const int64_t D = w.hidden_size;
  int64_t begin, end;
  thread_tiles(shape.M, thread, count, begin, end);
  s.rows_q.quantize(s.attended.data(), w.q_size(), begin, end);
#pragma omp barrier
  projection_rows(w.projections.o, s.rows_q, thread, count, s.middle.data(), D);
#pragma omp barrier
  for (int64_t m = begin; m < end; ++m) {
    for (int64_t i = 0; i < D; ++i) s.middle[m * D + i] += x[m * D + i];
  }
}

// The attention half of a layer: s.middle = x + attention(input_norm(x)) (this thread's rows of it, at the end).
void attention_block(const LayerCall& call, const CallShape& shape, const float* x, Scratch& s, int thread,
                     int count) {
  const LayerWeights& w = *call.weights;
  int64_t begin, end;
  thread_tiles(shape.M, thread, count, begin, end);
  norm_rows(x, w.input_norm, w.input_eps, w.hidden_size, s, begin, end);
#pragma omp barrier
  projection_rows(w.projections.qkv, s.rows_d, thread, count, s.qkv.data(), w.qkv_size());
#pragma omp barrier
  rotate_and_cache(call, shape, s, thread, count);
#pragma omp barrier
  attend_heads(call, shape, s, thread, count);
#pragma omp barrier
  project_attention_output(w, shape, x, s, thread, count);
}

// The gated SiLU MLP half of a layer: y = s.middle + down(silu(gate)·up) of post_norm(s.middle). It starts on the
// rows of s.middle this thread finished in attention_block (the same share of M), so without a barrier.
void mlp_block(const LayerWeights& w, const CallShape& shape, float* y, Scratch& s, int thread, int count) {
  const int64_t D = w.hidden_size, intermediate = w.intermediate;
  int64_t begin, end;
  thread_tiles(shape.M, thread, count, begin, end);
  norm_rows(s.middle.data(), w.post_norm, w.post_eps, D, s, begin, end);
#pragma omp barrier
  projection_rows(w.projections.gate_up, s.rows_d, thread, count, s.gate_up.data(), 2 * intermediate);
#pragma omp barrier
  for (int64_t m = begin; m < end; ++m) {
    const float* gate = s.gate_up.data() + m * 2 * intermediate;
    silu_times(gate, gate + intermediate, intermediate, s.normed.data() + m * intermediate);
  }
  s.rows_i.quantize(s.normed.data(), intermediate, begin, end);
#pragma omp barrier
  projection_rows(w.projections.down, s.rows_i, thread, count, y, D);
#pragma omp barrier
  for (int64_t m = begin; m < end; ++m) {
    for (int64_t i = 0; i < D; ++i) y[m * D + i] += s.middle[m * D + i];
  }
}

// One layer, run by every thread of the team (`thread` of `count`): x [M, D] in, y [M, D] out.
void run_layer(const LayerCall& call, const CallShape& shape, const float* x, float* y, Scratch& s, int thread,
               int count) {
  attention_block(call, shape, x, s, thread, count);
  mlp_block(*call.weights, shape, y, s, thread, count);
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
