// Quantized weight matrices as the operators hand them over, and the loops over their tiles (linear.cpp), shared by
// the linear operators and the decoder layer.

#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "blocks.h"

namespace d3 {

// One quantized weight matrix of `rows` outputs and `columns` inputs, packed in tiles (blocks.h) of a `Kind`:
// weight [tiles, tile_bytes] uint8; scale and offset [tiles, groups, kTileRows], float16 or float32 for q4/q5/q8
// (offset q4/q5 only; undefined: centred, w = (q − 8)·scale or (q − 16)·scale), float16 d and dmin per superblock
// of 256 for the k-quants (group_size 256; no offset for q6k); bias float32 [rows] or undefined.
struct Part {
  int64_t kind;
  int64_t group_size;
  int64_t rows;
  at::Tensor weight;
  at::Tensor scale;
  at::Tensor offset;
  at::Tensor bias;
};

// Rows of activations quantized to int8 blocks (blocks.h).
struct QuantizedRows {
  int64_t rows = 0, columns = 0;
  std::vector<int8_t> q;
  std::vector<float> d, sum;
  std::vector<int32_t> qsum, qsum16;

  void resize(int64_t rows, int64_t columns);
  void quantize(const float* x, int64_t x_stride, int64_t begin, int64_t end);  // rows [begin, end) of x
  QuantizedRow row(int64_t m) const {
    const int64_t blocks = columns / QK;
    return {q.data() + m * columns, d.data() + m * blocks, sum.data() + m * blocks, qsum.data() + m * blocks,
            qsum16.data() + 2 * m * blocks};
  }
};

void check_part(const Part& part, int64_t in_features);

// y[m, n] (+ bias[n]) for every row m of x and the outputs n of the tiles [begin, end) of `part`; y is
// [x.rows, y_stride].
void part_tiles(const Part& part, const QuantizedRows& x, int64_t begin, int64_t end, float* y, int64_t y_stride);

// This thread's share of a projection made of parts whose outputs sit side by side in y.
void projection_rows(const std::vector<Part>& parts, const QuantizedRows& x, int thread, int threads, float* y,
                     int64_t y_stride);

int threads_to_use();

}  // namespace d3
