"""What d3 reads off a loaded model: the same facts from transformers' models and d3's own, however their layers
and embedding tables are stored."""

import pytest
import torch
from torch import nn

from d3cli.base.errors import UserError
from d3cli.core.model.model_facts import (
    context_length,
    embedding_rows,
    find_decoder_layers,
    model_device,
    model_dtype,
    num_decoder_layers,
)


def test_the_facts_of_every_tiny_family(tiny_models):
    for family, model in tiny_models.items():
        layers = find_decoder_layers(model)
        assert layers is model.model.layers and len(layers) == num_decoder_layers(model) == 8, family
        assert context_length(model) == model.config.get_text_config(decoder=True).max_position_embeddings
        assert model_device(model) == torch.device("cpu") and model_dtype(model) == torch.float32
        assert torch.equal(embedding_rows(model, 5), model.get_input_embeddings().weight[:5].float())


def test_the_embedded_model_read_as_stored(embedded):
    assert num_decoder_layers(embedded.model) == 30 and context_length(embedded.model) == 8192
    rows = embedding_rows(embedded.model, 3)  # a Q8_0 / Q4_1 table in its blocks: dequantized rows
    assert rows.shape == (3, embedded.model.config.hidden_size) and rows.dtype == torch.float32


def test_a_model_whose_layers_form_no_list_is_refused_with_one_line():
    class Strange(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = None
            self.blocks = nn.ModuleList([nn.Linear(2, 2)])
            self.others = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(UserError, match="cannot find the decoder layers of Strange"):
        find_decoder_layers(Strange())
