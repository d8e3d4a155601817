"""Embedding tables kept in their quantized form: a lookup dequantizes only the rows it reads (a GGUF file's table
in any type: gguf_weights.GGUFRowsEmbedding; Q8_0 blocks in memory: `BlockInt8Embedding`)."""

from __future__ import annotations

import torch
from torch import nn

from d3cli.core.model.quantized import BlockInt8, tensor_bytes


class QuantizedEmbedding(nn.Module):
    """An embedding table kept in a quantized form: a lookup dequantizes only the rows it reads (`rows`), exactly as
    the file's own dequantization does, then scales them as a scaled embedding (Gemma's) does. The stored tensors are
    plain attributes, not buffers: `model.to(dtype)` leaves them exact (quantized weights run on the CPU only, so
    they never move)."""

    kind = "quantized embedding"  # what a weights report counts it as

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype, padding_idx: int | None = None,
                 embed_scale: torch.Tensor | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.output_dtype, self.embed_scale = dtype, embed_scale

    def rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The rows of `input_ids`, dequantized in float32 (unscaled)."""
        raise NotImplementedError

    def stored_tensors(self) -> list:
        """The tensors that hold the table (for byte counts)."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.rows(input_ids).to(self.output_dtype)
        if self.embed_scale is not None:  # as Gemma's ScaledWordEmbedding: the scale in the table's dtype
            rows = rows * self.embed_scale.to(self.output_dtype)
        return rows

    def weight_bytes(self) -> int:
        return tensor_bytes(*self.stored_tensors())


class BlockInt8Embedding(QuantizedEmbedding):
    """An embedding table kept as GGUF's Q8_0 blocks."""

    kind = "int8 embedding"

    def __init__(self, table: BlockInt8, dtype: torch.dtype, padding_idx: int | None = None,
                 embed_scale: torch.Tensor | None = None):
        super().__init__(*table.q.shape, dtype, padding_idx, embed_scale)
        self.group_size = table.group_size
        self.q, self.scale = table.q.contiguous(), table.scale.float().contiguous()

    def rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.q[input_ids].reshape(*input_ids.shape, -1, self.group_size).float()
        return (rows * self.scale[input_ids][..., None]).reshape(*input_ids.shape, self.embedding_dim)

    def stored_tensors(self) -> list:
        return [self.q, self.scale]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, blocks of {self.group_size}"

