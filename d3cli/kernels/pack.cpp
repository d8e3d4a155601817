// torch.ops.d3.pack_gguf_into(raw [rows, row bytes] uint8, type, tile_rows, unsigned, tiles, scale, offset) -> exact:
// a GGUF tensor's blocks straight into the tiles d3's kernels read (blocks.h), in one pass over the file's bytes,
// into tensors the caller made (slices of one buffer for weights stacked by rows).
//
//   type      0: Q4_0  1: Q4_1  3: Q8_0  4: Q5_0  5: Q5_1 (blocks of 32: q4, q8 and q5 tiles, a scale (and an
//             offset) per block), 2: Q4_K  6: Q5_K  7: Q6_K (superblocks of 256: q4k, q5k and q6k tiles)
//   tiles     [tiles, bytes per tile] uint8, laid out as blocks.h says for `tile_rows` rows a tile
//   scale     blocks of 32: [tiles, blocks, tile_rows] float16 or float32, the block's d; k-quants: [tiles,
//             superblocks, tile_rows] float16, the superblock's d
//   offset    like scale: Q4_1/Q5_1's m, Q4_K/Q5_K's dmin; an empty tensor for Q8_0, Q6_K and centred Q4_0/Q5_0 (the
//             kernels then take w = (q − 8)·d or (q − 16)·d; Q4_0 stacked with Q4_1 gets offsets −8d).
//             Padding rows are 0.
//
// The q8 tiles hold w + 128 when `unsigned`. The result says whether every scale and offset is exactly what the
// file says (float16 holds them all; float32 is for float-quantized stacks).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <tuple>

namespace d3 {

namespace {

enum Type : int64_t { kQ4_0 = 0, kQ4_1 = 1, kQ4_K = 2, kQ8_0 = 3, kQ5_0 = 4, kQ5_1 = 5, kQ5_K = 6, kQ6_K = 7 };

bool k_quant(int64_t type) { return type == kQ4_K || type == kQ5_K || type == kQ6_K; }

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
    case kQ5_0: return 22;
    case kQ5_1: return 24;
    case kQ5_K: return 176;
    case kQ6_K: return 210;
  }
  TORCH_CHECK(false, "pack_gguf: unknown type ", type);
}

int64_t block_weights(int64_t type) { return k_quant(type) ? 256 : 32; }

// Bytes of a block of 32 of a whole tile: q4 bytes and the high-bit planes (blocks.h).
int64_t tile_block_bytes(int64_t type, int64_t tile_rows) {
  switch (type) {
    case kQ8_0: return 32 * tile_rows;
    case kQ5_0: case kQ5_1: case kQ5_K: return 20 * tile_rows;
    case kQ6_K: return 24 * tile_rows;
  }
  return 16 * tile_rows;
}

int64_t header_bytes(int64_t type, int64_t tile_rows) { return (type == kQ6_K ? 16 : 12) * tile_rows; }

// One row's block of 32 values q (0..63) into a tile's block at row r: the q4 bytes (element 4j + i low, 16 + 4j + i
// high), then for 5 bits one plane, for 6 bits two (blocks.h).
void write_block(uint8_t* block, int64_t tile_rows, int64_t r, const uint8_t* q, int bits) {
  for (int j = 0; j < 4; ++j) {
    for (int i = 0; i < 4; ++i) {
      block[(j * tile_rows + r) * 4 + i] = (q[4 * j + i] & 0x0F) | ((q[16 + 4 * j + i] & 0x0F) << 4);
    }
  }
  if (bits == 5) {
    for (int i = 0; i < 4; ++i) {
      uint8_t plane = 0;
      for (int k = 0; k < 4; ++k) {
        plane |= ((q[4 * k + i] >> 4) & 1) << k;
        plane |= ((q[16 + 4 * k + i] >> 4) & 1) << (4 + k);
      }
      block[tile_rows * 16 + r * 4 + i] = plane;
    }
  } else if (bits == 6) {
    for (int i = 0; i < 4; ++i) {
      uint8_t low = 0, high = 0;
      for (int k = 0; k < 4; ++k) {
        low |= ((q[4 * k + i] >> 4) & 3) << (2 * k);
        high |= ((q[16 + 4 * k + i] >> 4) & 3) << (2 * k);
      }
      block[tile_rows * 16 + r * 4 + i] = low;
      block[tile_rows * 20 + r * 4 + i] = high;
    }
  }
}

}  // namespace

template <typename S>
bool pack(const at::Tensor& raw, int64_t type, int64_t tile_rows, bool is_unsigned, at::Tensor& packed,
          at::Tensor& scale, at::Tensor& offset);
bool pack_k(const at::Tensor& raw, int64_t type, int64_t tile_rows, at::Tensor& packed, at::Tensor& scale,
            at::Tensor& offset);

bool pack_gguf_into(const at::Tensor& raw, int64_t type, int64_t tile_rows, bool is_unsigned, at::Tensor tiles,
                    at::Tensor scale, at::Tensor offset) {
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.dim() == 2 && raw.is_contiguous(),
              "pack_gguf_into: raw must be contiguous uint8 [rows, row bytes]");
  const int64_t rows = raw.size(0), bytes = block_bytes(type);
  TORCH_CHECK(raw.size(1) % bytes == 0, "pack_gguf_into: a row is not a whole number of blocks");
  const int64_t count = (rows + tile_rows - 1) / tile_rows, blocks = raw.size(1) / bytes * block_weights(type) / 32;
  const int64_t groups = k_quant(type) ? blocks / 8 : blocks;
  const int64_t block_size = tile_block_bytes(type, tile_rows);
  const int64_t tile_bytes = k_quant(type) ? groups * (header_bytes(type, tile_rows) + 8 * block_size)
                                           : blocks * block_size;
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.is_contiguous() && tiles.dim() == 2 && tiles.size(0) == count &&
                  tiles.size(1) == tile_bytes,
              "pack_gguf_into: tiles must be contiguous uint8 [tiles, ", tile_bytes, "]");
  TORCH_CHECK(scale.is_contiguous() && scale.dim() == 3 && scale.size(0) == count && scale.size(1) == groups &&
                  scale.size(2) == tile_rows && (scale.scalar_type() == at::kHalf ||
                                                 (scale.scalar_type() == at::kFloat && !k_quant(type))),
              "pack_gguf_into: scale must be contiguous float16 or float32 [tiles, groups, tile_rows] (k-quants: "
              "float16)");
  const bool optional_offset = type == kQ4_0 || type == kQ5_0, no_offset = type == kQ8_0 || type == kQ6_K;
  TORCH_CHECK((offset.numel() == 0 && (optional_offset || no_offset)) ||
                  (!no_offset && offset.sizes() == scale.sizes() && offset.scalar_type() == scale.scalar_type() &&
                   offset.is_contiguous()),
              "pack_gguf_into: offset must match scale (or be empty: Q8_0, Q6_K, and Q4_0/Q5_0 centred)");
  if (k_quant(type)) return pack_k(raw, type, tile_rows, tiles, scale, offset);
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
  const int64_t group_bytes = tile_block_bytes(type, tile_rows);  // one block of 32 of a whole tile
  const bool q5 = type == kQ5_0 || type == kQ5_1;
  bool exact = true;

#pragma omp parallel for schedule(static) reduction(&& : exact)
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t r = 0; r < tile_rows; ++r) {
      const int64_t row = t * tile_rows + r;
      if (row >= rows) {  // padding rows hold w = 0 (stored as 128 in unsigned q8 tiles), scales 0
        for (int64_t g = 0; g < groups; ++g) {
          uint8_t* block = out + t * tile_bytes + g * group_bytes;
          for (int j = 0; j < (q8 ? 8 : q5 ? 5 : 4); ++j) {
            std::memset(block + (j * tile_rows + r) * 4, q8 && is_unsigned ? 128 : 0, 4);
          }
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
        const uint8_t* b = line + g * bytes;
        const float d = half_at(b);
        *s = S(d);
        if (o != nullptr) {  // centred Q4_0/Q5_0 tiles have none: w = (q − 8)·d, (q − 16)·d
          const float offset_value = type == kQ4_0 ? -8 * d : type == kQ5_0 ? -16 * d : half_at(b + 2);
          *o = S(offset_value);
          exact = exact && float(*o) == offset_value;
        }
        if (q5) {  // d (m) qh qs: element l's low bits in qs[l % 16] (l < 16 low, else high half), bit 4 in qh bit l
          const uint8_t* qh = b + (type == kQ5_0 ? 2 : 4);
          const uint8_t* qs = qh + 4;
          uint32_t high;
          std::memcpy(&high, qh, 4);
          uint8_t q[32];
          for (int l = 0; l < 16; ++l) {
            q[l] = (qs[l] & 0x0F) | (((high >> l) & 1) << 4);
            q[16 + l] = (qs[l] >> 4) | (((high >> (16 + l)) & 1) << 4);
          }
          write_block(block, tile_rows, r, q, 5);
          continue;
        }
        uint8_t pairs[16];
        std::memcpy(pairs, b + (type == kQ4_0 ? 2 : 4), 16);
        for (int j = 0; j < 4; ++j) std::memcpy(block + (j * tile_rows + r) * 4, pairs + 4 * j, 4);
      }
    }
  }
  return exact;
}

// The k-quants into q4k/q5k/q6k tiles: per tile and superblock, the header (the rows' scale bytes as words) and the
// 8 blocks, the superblock's d (and dmin) into `scale` (`offset`).
bool pack_k(const at::Tensor& raw, int64_t type, int64_t tile_rows, at::Tensor& packed, at::Tensor& scale,
            at::Tensor& offset) {
  const int64_t rows = raw.size(0), row_bytes = raw.size(1), bytes = block_bytes(type);
  const int64_t supers = scale.size(1), tiles = scale.size(0), tile_bytes = packed.size(1);
  const int64_t header = header_bytes(type, tile_rows), block_size = tile_block_bytes(type, tile_rows);
  const int64_t super_bytes = header + 8 * block_size;
  const uint8_t* source = raw.data_ptr<uint8_t>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  c10::Half* ds = scale.data_ptr<c10::Half>();
  c10::Half* dmins = offset.numel() ? offset.data_ptr<c10::Half>() : nullptr;
  const int words = type == kQ6_K ? 4 : 3, bits = type == kQ4_K ? 4 : type == kQ5_K ? 5 : 6;

#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t r = 0; r < tile_rows; ++r) {
      const int64_t row = t * tile_rows + r;
      for (int64_t s = 0; s < supers; ++s) {
        uint8_t* super = out + t * tile_bytes + s * super_bytes;
        const int64_t at = (t * supers + s) * tile_rows + r;
        if (row >= rows) {  // padding rows: all zero (d = 0)
          for (int w = 0; w < words; ++w) std::memset(super + (w * tile_rows + r) * 4, 0, 4);
          const uint8_t zeros[32] = {};
          for (int j = 0; j < 8; ++j) write_block(super + header + j * block_size, tile_rows, r, zeros, bits);
          ds[at] = c10::Half(0.0f);
          if (dmins != nullptr) dmins[at] = c10::Half(0.0f);
          continue;
        }
        const uint8_t* b = source + row * row_bytes + s * bytes;
        const uint8_t* scales = type == kQ6_K ? b + 192 : b + 4;
        for (int w = 0; w < words; ++w) std::memcpy(super + (w * tile_rows + r) * 4, scales + 4 * w, 4);
        std::memcpy(&ds[at], type == kQ6_K ? b + 208 : b, 2);
        if (dmins != nullptr) std::memcpy(&dmins[at], b + 2, 2);
        for (int j = 0; j < 8; ++j) {
          uint8_t q[32];
          if (type == kQ6_K) {  // ql[128] qh[64]: element 32j + l of the superblock (llama.cpp's dequantize_row_q6_K)
            const int n = j / 4, quarter = j % 4;
            const uint8_t* ql = b + 64 * n + (quarter & 1) * 32;
            const uint8_t* qh = b + 128 + 32 * n;
            for (int l = 0; l < 32; ++l) {
              q[l] = (quarter >= 2 ? ql[l] >> 4 : ql[l] & 0x0F) | (((qh[l] >> (2 * quarter)) & 3) << 4);
            }
          } else {  // Q4_K: qs[128] at 16; Q5_K: qh[32] at 16, qs[128] at 48; block j in chunk j / 2's halves
            const uint8_t* qs = b + (type == kQ4_K ? 16 : 48) + (j / 2) * 32;
            const int shift = (j % 2) * 4;
            for (int l = 0; l < 32; ++l) {
              q[l] = (qs[l] >> shift) & 0x0F;
              if (type == kQ5_K) q[l] |= ((b[16 + l] >> j) & 1) << 4;
            }
          }
          write_block(super + header + j * block_size, tile_rows, r, q, bits);
        }
      }
    }
  }
  return true;
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
