// The quantized linear layers' operators: y = x·Wᵀ for W packed in tiles of blocks of 32 (blocks.h), any number of
// rows of x.
//
//   torch.ops.d3.q4_linear(x [M, K], tiles, scale, offset or None (centred: w = (q − 8)·scale), group_size, rows)
//   torch.ops.d3.q8_linear(x [M, K], tiles, scale, group_size, rows) -> [M, rows]
//   torch.ops.d3.tiled_linear(x [M, K], kind, tiles, scale, offset or None, group_size, rows) -> [M, rows]: any kind
//       of blocks.h (q4, q5, q8, and GGUF's k-quants q4k, q5k, q6k as the file stores them)
//   torch.ops.d3.layout() -> [rows a tile, 1 when q8 tiles hold w + 128]
//   torch.ops.d3.instruction_set() -> "avx512-vnni", "avx2-vnni", "avx2" or "portable"
//
// x is float32 or bfloat16 (the result has its dtype). Threads split the tiles; each row of y is computed exactly
// as it would be alone.

#include "linear.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <omp.h>
#include <torch/library.h>

#include <optional>

#include <vector>

namespace d3 {

void QuantizedRows::resize(int64_t rows_, int64_t columns_) {
  rows = rows_;
  columns = columns_;
  q.resize(rows * columns);
  d.resize(rows * columns / QK);
  sum.resize(rows * columns / QK);
  qsum.resize(rows * columns / QK);
  qsum16.resize(2 * rows * columns / QK);
}

void QuantizedRows::quantize(const float* x, int64_t x_stride, int64_t begin, int64_t end) {
  const int64_t blocks = columns / QK;
  for (int64_t m = begin; m < end; ++m) {
    quantize_row(x + m * x_stride, columns, q.data() + m * columns, d.data() + m * blocks, sum.data() + m * blocks,
                 qsum.data() + m * blocks, qsum16.data() + 2 * m * blocks);
  }
}

void check_part(const Part& part, int64_t in_features) {
  const int64_t kind = part.kind;
  TORCH_CHECK(kind == kQ4 || kind == kQ5 || kind == kQ8 || is_k_quant(kind), "a part's kind is 4, 5, 8, 14, 15 or 16");
  TORCH_CHECK(in_features % QK == 0, "K must be a multiple of 32");
  if (is_k_quant(kind)) {
    TORCH_CHECK(part.group_size == 256 && in_features % 256 == 0, "k-quants come in superblocks of 256");
  }
  TORCH_CHECK(part.group_size % QK == 0 && in_features % part.group_size == 0,
              "group_size must be a multiple of 32 dividing K");
  const int64_t tiles = (part.rows + kTileRows - 1) / kTileRows, bytes = tiles * tile_bytes(kind, in_features);
  TORCH_CHECK(part.weight.device().is_cpu() && part.weight.scalar_type() == at::kByte && part.weight.is_contiguous() &&
                  part.weight.numel() == bytes,
              "the weight must be contiguous uint8 tiles of ", bytes, " bytes");
  TORCH_CHECK(part.scale.is_contiguous() && part.scale.numel() == tiles * (in_features / part.group_size) * kTileRows &&
                  (part.scale.scalar_type() == at::kHalf ||
                   (part.scale.scalar_type() == at::kFloat && !is_k_quant(kind))),
              "scale must be contiguous float32 or float16 [tiles, groups, ", kTileRows, "] (float16 for k-quants)");
  if (part.offset.defined()) {
    TORCH_CHECK((kind == kQ4 || kind == kQ5 || kind == kQ4K || kind == kQ5K) &&
                    part.offset.sizes() == part.scale.sizes() &&
                    part.offset.scalar_type() == part.scale.scalar_type() && part.offset.is_contiguous(),
                "offset must match scale (q4, q5, q4k and q5k only)");
  } else {
    TORCH_CHECK(kind != kQ4K && kind != kQ5K, "q4k and q5k need their dmin as the offset");
  }
  if (part.bias.defined()) {
    TORCH_CHECK(part.bias.scalar_type() == at::kFloat && part.bias.is_contiguous() && part.bias.numel() == part.rows,
                "bias must be float32 [rows]");
  }
}

namespace {

template <int64_t kKind, typename S, int N>
inline void dot_rows(const uint8_t* tile, const S* scale, const S* offset, int64_t blocks, int64_t groups,
                     int64_t group_size, const QuantizedRow* rows, float* values) {
  if constexpr (is_k_quant(kKind)) {
    tile_dot_k<kKind, N>(tile, scale, offset, groups, rows, values);
  } else {
    tile_dot<kKind, S, N>(tile, scale, offset, blocks, group_size / QK, rows, values);
  }
}

template <int64_t kKind, typename S>
void run_tiles(const Part& part, const QuantizedRows& x, int64_t begin, int64_t end, float* y, int64_t y_stride) {
  const int64_t blocks = x.columns / QK, groups = x.columns / part.group_size;
  const int64_t bytes = tile_bytes(kKind, x.columns);
  const uint8_t* weights = part.weight.data_ptr<uint8_t>();
  const S* scales = reinterpret_cast<const S*>(part.scale.data_ptr());
  const S* offsets = part.offset.defined() ? reinterpret_cast<const S*>(part.offset.data_ptr()) : nullptr;
  const float* bias = part.bias.defined() ? part.bias.data_ptr<float>() : nullptr;
  alignas(64) float values[kRowsAtOnce * kTileRows];
  QuantizedRow rows[kRowsAtOnce];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t first = t * kTileRows, count = std::min(kTileRows, part.rows - first);
    const uint8_t* tile = weights + t * bytes;
    const S* scale = scales + t * groups * kTileRows;
    const S* offset = offsets != nullptr ? offsets + t * groups * kTileRows : nullptr;
    for (int64_t m = 0; m < x.rows;) {  // kRowsAtOnce rows of x at a time (a prefill's), then one at a time
      const int n = x.rows - m >= kRowsAtOnce ? kRowsAtOnce : 1;
      for (int i = 0; i < n; ++i) rows[i] = x.row(m + i);
      if (n == kRowsAtOnce) {
        dot_rows<kKind, S, kRowsAtOnce>(tile, scale, offset, blocks, groups, part.group_size, rows, values);
      } else {
        dot_rows<kKind, S, 1>(tile, scale, offset, blocks, groups, part.group_size, rows, values);
      }
      for (int i = 0; i < n; ++i) {
        float* out = y + (m + i) * y_stride + first;
        const float* row_values = values + i * kTileRows;
        for (int64_t r = 0; r < count; ++r) out[r] = bias != nullptr ? row_values[r] + bias[first + r] : row_values[r];
      }
      m += n;
    }
  }
}

template <int64_t kKind>
void run_group_tiles(const Part& part, const QuantizedRows& x, int64_t begin, int64_t end, float* y,
                     int64_t y_stride) {
  part.scale.scalar_type() == at::kHalf ? run_tiles<kKind, c10::Half>(part, x, begin, end, y, y_stride)
                                        : run_tiles<kKind, float>(part, x, begin, end, y, y_stride);
}

}  // namespace

void part_tiles(const Part& part, const QuantizedRows& x, int64_t begin, int64_t end, float* y, int64_t y_stride) {
  switch (part.kind) {
    case kQ4: return run_group_tiles<kQ4>(part, x, begin, end, y, y_stride);
    case kQ5: return run_group_tiles<kQ5>(part, x, begin, end, y, y_stride);
    case kQ8: return run_group_tiles<kQ8>(part, x, begin, end, y, y_stride);
    case kQ4K: return run_tiles<kQ4K, c10::Half>(part, x, begin, end, y, y_stride);
    case kQ5K: return run_tiles<kQ5K, c10::Half>(part, x, begin, end, y, y_stride);
    case kQ6K: return run_tiles<kQ6K, c10::Half>(part, x, begin, end, y, y_stride);
  }
}

void projection_rows(const std::vector<Part>& parts, const QuantizedRows& x, int thread, int threads, float* y,
                     int64_t y_stride) {
  int64_t first = 0;
  for (const Part& part : parts) {
    int64_t begin, end;
    thread_tiles((part.rows + kTileRows - 1) / kTileRows, thread, threads, begin, end);
    part_tiles(part, x, begin, end, y + first, y_stride);
    first += part.rows;
  }
}

int threads_to_use() { return std::max(1, at::get_num_threads()); }

namespace {

at::Tensor linear(const at::Tensor& x, const Part& part) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "x must be a [M, K] CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  check_part(part, x.size(1));
  const at::Tensor input = x.to(at::kFloat).contiguous();
  const int64_t M = input.size(0), K = input.size(1);
  at::Tensor out = at::empty({M, part.rows}, input.options());
  QuantizedRows rows;
  rows.resize(M, K);
  const float* source = input.data_ptr<float>();
  float* y = out.data_ptr<float>();
  const int64_t tiles = (part.rows + kTileRows - 1) / kTileRows;
  const int threads = static_cast<int>(std::min<int64_t>(threads_to_use(), tiles));
#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num(), count = omp_get_num_threads();
    int64_t begin, end;
    thread_tiles(M, thread, count, begin, end);
    rows.quantize(source, K, begin, end);
#pragma omp barrier
    thread_tiles(tiles, thread, count, begin, end);
    part_tiles(part, rows, begin, end, y, part.rows);
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scale,
                     const std::optional<at::Tensor>& offset, int64_t group_size, int64_t rows) {
  return linear(x, Part{4, group_size, rows, tiles, scale, offset.value_or(at::Tensor()), at::Tensor()});
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scale, int64_t group_size,
                     int64_t rows) {
  return linear(x, Part{8, group_size, rows, tiles, scale, at::Tensor(), at::Tensor()});
}

at::Tensor tiled_linear(const at::Tensor& x, int64_t kind, const at::Tensor& tiles, const at::Tensor& scale,
                        const std::optional<at::Tensor>& offset, int64_t group_size, int64_t rows) {
  return linear(x, Part{kind, group_size, rows, tiles, scale, offset.value_or(at::Tensor()), at::Tensor()});
}

std::vector<int64_t> layout() { return {kTileRows, kUnsignedQ8 ? 1 : 0}; }

std::string instruction_set() {
#if defined(D3_AVX512)
  return "avx512-vnni";
#elif defined(D3_AVX2) && defined(__AVXVNNI__)
  return "avx2-vnni";
#elif defined(D3_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

}  // namespace

}  // namespace d3

TORCH_LIBRARY_FRAGMENT(d3, m) {
  m.def("q4_linear(Tensor x, Tensor tiles, Tensor scale, Tensor? offset, int group_size, int rows) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor tiles, Tensor scale, int group_size, int rows) -> Tensor");
  m.def("tiled_linear(Tensor x, int kind, Tensor tiles, Tensor scale, Tensor? offset, int group_size, int rows) -> "
        "Tensor");
  m.def("layout() -> int[]", &d3::layout);
  m.def("instruction_set() -> str", &d3::instruction_set);
}

TORCH_LIBRARY_IMPL(d3, CPU, m) {
  m.impl("q4_linear", &d3::q4_linear);
  m.impl("q8_linear", &d3::q8_linear);
  m.impl("tiled_linear", &d3::tiled_linear);
}
