"""Embedding tables kept quantized: a lookup gives exactly the dequantized rows, scaled where the model scales them,
and the blocks keep their form whatever dtype the model moves to."""

import torch

from d3cli.core.model.embeddings import BlockInt8Embedding
from d3cli.core.model.quantized import BlockInt8


def test_block_int8_embedding_reads_exact_rows():
    generator = torch.Generator().manual_seed(1)
    table = BlockInt8(torch.randint(-128, 128, (10, 64), dtype=torch.int8, generator=generator),
                      torch.rand(10, 2, generator=generator))
    embedding = BlockInt8Embedding(table, torch.float32)
    ids = torch.tensor([[3, 0, 9]])
    assert torch.equal(embedding(ids), table.dequantize()[ids])
    embedding.to(torch.bfloat16)  # the blocks stay as they are
    assert torch.equal(embedding.rows(ids), table.dequantize()[ids])
    assert embedding.weight_bytes() == 10 * 64 + table.scale.numel() * table.scale.element_size()


def test_a_scaled_embedding_multiplies_its_rows_in_the_models_dtype():
    table = BlockInt8(torch.ones(4, 32, dtype=torch.int8), torch.full((4, 1), 0.5))
    scaled = BlockInt8Embedding(table, torch.float32, embed_scale=torch.tensor(3.0))
    assert torch.equal(scaled(torch.tensor([1])), torch.full((1, 32), 1.5))
