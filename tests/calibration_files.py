"""Calibration files for tests: a tiny model's identity, a layer profile and bridges that fit it, written to disk."""

from __future__ import annotations

import torch

from d3cli.core.calibration.layer_profile import LayerProfile, LayerScore
from d3cli.core.calibration.model_calibration import write_calibration
from d3cli.core.decode.bridges import Bridge
from d3cli.core.model.loader import model_identity

FIT = {"ridge": 0.1, "tokens": 123, "skip_order": "importance"}


def identity_of(tiny_model_dir):
    from d3cli.core.model.loader import load

    return model_identity(load(str(tiny_model_dir), device="cpu", dtype="float32"))


def profile_for(identity: dict) -> LayerProfile:
    costs = [5.0, 0.3, 0.1, 0.05, 0.2, 0.4, 0.6, 2.0]
    return LayerProfile(model=identity, corpus="test", texts=3, late_from=16,
                        layers=tuple(LayerScore(layer, cost / 10, cost) for layer, cost in enumerate(costs)))


def some_bridges(hidden: int = 64, seed: int = 0) -> list[Bridge]:
    generator = torch.Generator().manual_seed(seed)
    return [Bridge(3, 3, weight=torch.randn(hidden, hidden, generator=generator) / 8),
            Bridge(2, 4, down=torch.randn(hidden, 4, generator=generator),
                   up=torch.randn(4, hidden, generator=generator))]


def calibration_file(tmp_path, identity, **changes) -> str:
    path = tmp_path / "c.safetensors"
    profile = None if changes else profile_for(identity)  # another model's file has another model's profile
    write_calibration(path, dict(identity, **changes), profile, some_bridges(), FIT)
    return str(path)
