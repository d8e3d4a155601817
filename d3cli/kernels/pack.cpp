// torch.ops.d3.pack_gguf_into(raw [rows, row bytes] uint8, type, tile_rows, unsigned, tiles, scale, offset) -> exact:
// a GGUF tensor's Q4_0 / Q4_1 / Q4_K / Q8_0 blocks straight into the tiles the q4/q8 kernels read, in one pass over
// the file's bytes, into tensors the caller made (slices of one buffer for weights stacked by rows); the same bytes
// as d3cli/core/gguf_tiles.py's numpy packing, which a test holds it to.
//
//   type      0: Q4_0  1: Q4_1  2: Q4_K  3: Q8_0
//   tiles     [tiles, bytes per tile] uint8: per block of 32, byte (j, r, i) = row r's element 4j + i (low half) and
//             16 + 4j + i (high half) for q4; row r's element 4j + i (+ 128 when `unsigned`) for q8
//   scale     [tiles, groups, tile_rows] float32; offset the same (q4; an empty tensor for q8, and for Q4_0 packed
//             centred: the kernels then take w = (q − 8)·d). Padding rows are 0.
//
// Scales and offsets in the dtype of `scale` (float16 or float32); the result says whether every one of them is exactly
// what the block says (float16 always holds Q4_0/Q4_1/Q8_0's, and Q4_K's only now and then).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <tuple>

namespace d3 {

namespace {

enum Type : int64_t { kQ4_0 = 0, kQ4_1 = 1, kQ4_K = 2, kQ8_0 = 3 };

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

int64_t block_bytes(int64_t type) {
  switch (type) {
    case kQ4_0: return 18;
    case kQ4_1: return 20;
    case kQ4_K: return 144;
    case kQ8_0: return 34;
  }
  TORCH_CHECK(false, "pack_gguf: unknown type ", type);
}

int64_t block_weights(int64_t type) { return type == kQ4_K ? 256 : 32; }

// Q4_K's 6-bit scale and minimum of group j from the 12 packed bytes (llama.cpp's get_scale_min_k4)
inline void scale_min_k4(int j, const uint8_t* q, uint8_t& d, uint8_t& m) {
  if (j < 4) {
    d = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

}  // namespace

template <typename S>
bool pack(const at::Tensor& raw, int64_t type, int64_t tile_rows, bool is_unsigned, at::Tensor& packed,
          at::Tensor& scale, at::Tensor& offset);

bool pack_gguf_into(const at::Tensor& raw, int64_t type, int64_t tile_rows, bool is_unsigned, at::Tensor tiles,
                    at::Tensor scale, at::Tensor offset) {
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.dim() == 2 && raw.is_contiguous(),
              "pack_gguf_into: raw must be contiguous uint8 [rows, row bytes]");
  const int64_t rows = raw.size(0), bytes = block_bytes(type);
  TORCH_CHECK(raw.size(1) % bytes == 0, "pack_gguf_into: a row is not a whole number of blocks");
  const int64_t groups = raw.size(1) / bytes * block_weights(type) / 32, count = (rows + tile_rows - 1) / tile_rows;
  const bool q8 = type == kQ8_0;
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.is_contiguous() && tiles.dim() == 2 && tiles.size(0) == count &&
                  tiles.size(1) == groups * 32 * tile_rows / (q8 ? 1 : 2),
              "pack_gguf_into: tiles must be contiguous uint8 [tiles, bytes per tile]");
  TORCH_CHECK(scale.is_contiguous() && scale.dim() == 3 && scale.size(0) == count && scale.size(1) == groups &&
                  scale.size(2) == tile_rows && (scale.scalar_type() == at::kHalf || scale.scalar_type() == at::kFloat),
              "pack_gguf_into: scale must be contiguous float16 or float32 [tiles, groups, tile_rows]");
  TORCH_CHECK(q8 || (offset.numel() == 0 && type == kQ4_0) ||
                  (offset.sizes() == scale.sizes() && offset.scalar_type() == scale.scalar_type() &&
                   offset.is_contiguous()),
              "pack_gguf_into: offset must match scale (or be empty: Q4_0 centred, no offsets)");
  return scale.scalar_type() == at::kHalf ? pack<c10::Half>(raw, type, tile_rows, is_unsigned, tiles, scale, offset)
                                          : pack<float>(raw, type, tile_rows, is_unsigned, tiles, scale, offset);
}

// Packs into the tensors given; false when a scale or offset did not fit S exactly (Q4_0's -8d beyond float16).
template <typename S>
bool pack(const at::Tensor& raw, int64_t type, int64_t tile_rows, bool is_unsigned, at::Tensor& packed,
          at::Tensor& scale, at::Tensor& offset) {
  const int64_t rows = raw.size(0), row_bytes = raw.size(1), bytes = block_bytes(type);
  const int64_t groups = scale.size(1), tiles = scale.size(0), tile_bytes = packed.size(1);
  const bool q8 = type == kQ8_0;
  const uint8_t* source = raw.data_ptr<uint8_t>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  S* scales = reinterpret_cast<S*>(scale.data_ptr());
  S* offsets = q8 || offset.numel() == 0 ? nullptr : reinterpret_cast<S*>(offset.data_ptr());
  const int64_t group_bytes = q8 ? 32 * tile_rows : 16 * tile_rows;  // one block of 32 of a whole tile
  bool exact = true;

#pragma omp parallel for schedule(static) reduction(&& : exact)
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t r = 0; r < tile_rows; ++r) {
      const int64_t row = t * tile_rows + r;
      if (row >= rows) {  // padding rows hold w = 0 (stored as 128 in unsigned q8 tiles), scales 0
        for (int64_t g = 0; g < groups; ++g) {
          uint8_t* block = out + t * tile_bytes + g * group_bytes;
          for (int j = 0; j < (q8 ? 8 : 4); ++j) std::memset(block + (j * tile_rows + r) * 4, q8 && is_unsigned ? 128 : 0, 4);
          scales[(t * groups + g) * tile_rows + r] = S(0.0f);
          if (offsets != nullptr) offsets[(t * groups + g) * tile_rows + r] = S(0.0f);
        }
        continue;
      }
      const uint8_t* line = source + row * row_bytes;
      for (int64_t g = 0; g < groups; ++g) {
        uint8_t* block = out + t * tile_bytes + g * group_bytes;
        S* s = scales + (t * groups + g) * tile_rows + r;
        if (q8) {
          const uint8_t* b = line + g * 34;
          *s = S(half_at(b));
          for (int j = 0; j < 8; ++j) {
            uint8_t* to = block + (j * tile_rows + r) * 4;
            for (int i = 0; i < 4; ++i) to[i] = is_unsigned ? uint8_t(b[2 + 4 * j + i] ^ 0x80) : b[2 + 4 * j + i];
          }
          continue;
        }
        S* o = offsets != nullptr ? offsets + (t * groups + g) * tile_rows + r : nullptr;
        uint8_t pairs[16];
        if (type == kQ4_K) {
          const uint8_t* b = line + (g / 8) * 144;
          const int j = int(g % 8);
          uint8_t sc, m;
          scale_min_k4(j, b + 4, sc, m);
          const float scale_value = half_at(b) * float(sc), offset_value = -(half_at(b + 2) * float(m));
          *s = S(scale_value);
          *o = S(offset_value);
          exact = exact && float(*s) == scale_value && float(*o) == offset_value;
          const uint8_t* chunk = b + 16 + (j / 2) * 32;  // 64 weights: group 2c in low halves, 2c + 1 in high
          const int shift = (j % 2) * 4;
          for (int p = 0; p < 16; ++p) pairs[p] = ((chunk[p] >> shift) & 0xF) | (((chunk[16 + p] >> shift) & 0xF) << 4);
        } else {
          const uint8_t* b = line + g * bytes;
          const float d = half_at(b);
          *s = S(d);
          if (o != nullptr) {  // centred Q4_0 tiles have none: w = (q − 8)·d
            const float offset_value = type == kQ4_0 ? -8 * d : half_at(b + 2);
            *o = S(offset_value);
            exact = exact && float(*o) == offset_value;
          }
          std::memcpy(pairs, b + (type == kQ4_0 ? 2 : 4), 16);
        }
        for (int j = 0; j < 4; ++j) std::memcpy(block + (j * tile_rows + r) * 4, pairs + 4 * j, 4);
      }
    }
  }
  return exact;
}

// torch.ops.d3.dequantize_q6_k(raw [rows, row bytes] uint8) -> [rows, columns] float32: GGUF's Q6_K blocks (256
// weights: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, a float16 d) as the gguf package's
// dequantization computes them, (d * scale) * (q - 32) in float32, to the bit; ~10x faster than its numpy.
at::Tensor dequantize_q6_k(const at::Tensor& raw) {
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.dim() == 2 && raw.is_contiguous() && raw.size(1) % 210 == 0,
              "dequantize_q6_k: raw must be contiguous uint8 [rows, 210 * blocks]");
  const int64_t rows = raw.size(0), blocks = raw.size(1) / 210;
  at::Tensor out = at::empty({rows, blocks * 256}, raw.options().dtype(at::kFloat));
  const uint8_t* source = raw.data_ptr<uint8_t>();
  float* values = out.data_ptr<float>();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < rows * blocks; ++b) {
    const uint8_t* block = source + b * 210;
    const uint8_t *ql = block, *qh = block + 128;
    const int8_t* scales = reinterpret_cast<const int8_t*>(block + 192);
    const float d = half_at(block + 208);
    float* y = values + b * 256;
    for (int half = 0; half < 2; ++half) {  // 128 weights: ql[64], qh[32], scales[8]
      for (int l = 0; l < 32; ++l) {
        const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        const int is = l / 16;
        y[l] = (d * float(scales[is])) * float(q1);
        y[l + 32] = (d * float(scales[is + 2])) * float(q2);
        y[l + 64] = (d * float(scales[is + 4])) * float(q3);
        y[l + 96] = (d * float(scales[is + 6])) * float(q4);
      }
      y += 128;
      ql += 64;
      qh += 32;
      scales += 8;
    }
  }
  return out;
}

}  // namespace d3

TORCH_LIBRARY_FRAGMENT(d3, m) {
  m.def("dequantize_q6_k(Tensor raw) -> Tensor");
  m.def("pack_gguf_into(Tensor raw, int type, int tile_rows, bool is_unsigned, Tensor(a!) tiles, Tensor(b!) scale, "
        "Tensor(c!) offset) -> bool");
}

TORCH_LIBRARY_IMPL(d3, CPU, m) {
  m.impl("pack_gguf_into", &d3::pack_gguf_into);
  m.impl("dequantize_q6_k", &d3::dequantize_q6_k);
}
