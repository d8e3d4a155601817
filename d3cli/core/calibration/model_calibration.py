"""One calibration per model: what d3 learned about a model's layers, in one safetensors file.

The file holds the bridges' matrices as float16 tensors (`bridge.FIRST.LAST.weight`, or `.down` and `.up` when
low-rank: half the bytes of float32, and their rounding is far below what a fit leaves unexplained) and, in the
safetensors header's metadata under "d3", a JSON object with the rest: the format, the model's identity
(architecture facts and a weight fingerprint, as `loader.model_identity`), the layer profile behind the `importance`
skip order, the runs bridged and how they were fitted (corpus, tokens, ridge, rank), and the schedule (α,
min-layers) its last stage chose with what that choice rests on (schedule_choice.py; files from before d3 chose
schedules have none, and the model then gets d3's default schedule).

`d3 calibrate` writes one to the user cache, named after the model's identity; every command finds it there by
itself (`find_calibration`), else uses the one d3 ships for the embedded model. `--calibration FILE` names one
explicitly; a file made for another model, or a damaged one, is a UserError.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from d3cli.base.errors import UserError
from d3cli.base.files import write_atomically
from d3cli.base.paths import BUNDLED, cache_home
from d3cli.core.calibration.layer_profile import LayerProfile, LayerScore, identity_mismatch
from d3cli.core.decode.bridges import Bridge, Bridges

CALIBRATION_FORMAT = "d3-calibration/1"
STORED_DTYPE = "float16"  # how bridges are stored; they are used in the model's own dtype
BUNDLED_CALIBRATION = BUNDLED / "smollm2-135m-instruct.calibration.safetensors"
_TENSOR_NAME = re.compile(r"^bridge\.(\d+)\.(\d+)\.(weight|down|up)$")


@dataclass
class ModelCalibration:
    """A calibration file's contents; `bridges` are on the CPU in float32, `active_bridges` on the model's device."""

    path: Path
    model: dict  # the identity it was made for
    profile: LayerProfile | None
    fit: dict  # how the bridges were fitted: corpus, tokens, ridge, rank, skip order, head, tail
    bridges: object = field(repr=False, default=None)  # bridges.Bridges (empty when the file has none)
    bundled: bool = False
    active_bridges: object = field(repr=False, default=None)  # `bridges` on the model's device, after `activate`
    schedule: dict | None = None  # the α and min-layers its schedule stage chose, and what that rests on (None:
    # a calibration from before d3 chose schedules)

    @property
    def label(self) -> str:
        """How summaries name it: "bundled" for the one shipped with d3, else its path."""
        return "bundled" if self.bundled else str(self.path)

    @property
    def weights(self) -> str:
        """The kind of weights it was made on."""
        return made_on(self.model)

    def activate(self, device, dtype) -> None:
        """The bridges as schedules carry them: on the model's device and dtype, each moved when first used."""
        self.active_bridges = self.bridges.on(device, dtype) if len(self.bridges) else None

    def header(self) -> dict:
        return header_of(self.model, self.profile, self.fit, self.schedule)


def made_on(identity: dict) -> str:
    """The kind of weights a calibration (or a model) with `identity` ran: files from before d3 recorded it were
    all made on float32 weights."""
    return str(identity.get("weights") or "float32")


def header_of(identity: dict, profile: LayerProfile | None, fit: dict, schedule: dict | None = None) -> dict:
    header = {"format": CALIBRATION_FORMAT, "model": identity,
              "profile": profile.as_dict() if profile is not None else None, "fit": fit}
    if schedule is not None:
        header["schedule"] = schedule
    return header


def write_calibration(path: Path, identity: dict, profile: LayerProfile | None, bridges, fit: dict,
                      schedule: dict | None = None) -> None:
    """Write the calibration to `path` through a temporary file and a rename, so a crash leaves no half file."""
    from safetensors.torch import save


    stored = getattr(torch, STORED_DTYPE)
    tensors = {}
    for bridge in bridges:
        tensors.update({name: tensor.detach().to("cpu", stored).contiguous()
                        for name, tensor in bridge.tensors().items()})
    metadata = {"d3": json.dumps(header_of(identity, profile, fit, schedule))}
    write_atomically(Path(path), save(tensors, metadata=metadata), make_parents=True)


def read_header(path: Path) -> dict:
    """The JSON metadata of a calibration file, without reading its tensors (a UserError if it is not one)."""
    header_bytes = _header_bytes(path)
    try:
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not a d3 calibration file (not a safetensors file)") from None
    try:
        payload = json.loads(header["__metadata__"]["d3"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not a d3 calibration file (no d3 metadata in its header)") from None
    try:
        data_end = max((int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"),
                       default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise UserError(f"{path} is damaged: its header lists a tensor without data offsets") from None
    expected, actual = 8 + len(header_bytes) + data_end, path.stat().st_size
    if actual < expected:
        raise UserError(f"{path} is cut short: {actual} bytes of the {expected} its header describes")
    if not isinstance(payload, dict) or payload.get("format") != CALIBRATION_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise UserError(f"{path} is not a d3 calibration file: format {found!r}, not {CALIBRATION_FORMAT!r}")
    return payload


def _header_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            size_bytes = handle.read(8)
            if len(size_bytes) < 8:
                raise UserError(f"{path} is not a d3 calibration file (it is {len(size_bytes)} bytes long)")
            size = int.from_bytes(size_bytes, "little")
            if size > 100_000_000:
                raise UserError(f"{path} is not a d3 calibration file (not a safetensors file)")
            header = handle.read(size)
    except OSError as error:
        raise UserError(f"cannot read the calibration file {path}: {error.strerror or error}") from None
    if len(header) < size:
        raise UserError(f"{path} is cut short: its header says {size} bytes, the file has {len(header)} after it")
    return header


def read_calibration(path: str | Path, bundled: bool = False) -> ModelCalibration:
    """Read and check a calibration file: its metadata, every tensor's shape, no NaN or infinity. UserError if not."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file


    path = Path(path).expanduser()
    payload = read_header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise UserError(f"{path} is damaged: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
                        ) from None
    try:
        identity = dict(payload["model"])
        num_layers, hidden_size = int(identity["num_layers"]), int(identity["hidden_size"])
        profile = _profile_from(payload.get("profile"), identity, num_layers)
        fit = dict(payload.get("fit") or {})
        schedule = _schedule_from(payload.get("schedule"), num_layers)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path} is not a d3 calibration file: bad metadata ({error})") from None

    parts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _TENSOR_NAME.match(name)
        if match is None:
            raise UserError(f"{path}: unexpected tensor {name!r}")
        first, last = int(match.group(1)), int(match.group(2))
        if not 0 <= first <= last < num_layers:
            raise UserError(f"{path}: tensor {name} bridges layers {first}..{last}, the model has {num_layers}")
        if not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{path}: tensor {name} holds NaN or infinite values")
        parts.setdefault((first, last), {})[match.group(3)] = tensor.float()
    bridges = []
    for (first, last), found in sorted(parts.items()):
        bridges.append(_bridge_from(path, first, last, found, hidden_size))
    return ModelCalibration(path=path, model=identity, profile=profile, fit=fit,
                            bridges=Bridges(bridges, "bundled" if bundled else str(path)), bundled=bundled,
                            schedule=schedule)


def _schedule_from(data, num_layers: int) -> dict | None:
    """A calibration's chosen schedule, checked: α in (0, 1], min-layers a whole number of layers up to L."""
    if data is None:
        return None
    schedule = dict(data)
    alpha, floor = schedule.get("alpha"), schedule.get("min_layers")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise ValueError(f"the chosen schedule's alpha must lie in (0, 1], not {alpha!r}")
    if isinstance(floor, bool) or not isinstance(floor, int) or not 1 <= floor <= num_layers:
        raise ValueError(f"the chosen schedule's min_layers must be a layer count from 1 to {num_layers}, "
                         f"not {floor!r}")
    return schedule


def _bridge_from(path: Path, first: int, last: int, found: dict, hidden_size: int):
    name = f"bridge.{first}.{last}"
    if "weight" in found:
        if set(found) != {"weight"} or tuple(found["weight"].shape) != (hidden_size, hidden_size):
            raise UserError(f"{path}: {name}.weight has shape {tuple(found['weight'].shape)}, expected "
                            f"({hidden_size}, {hidden_size}) for this model's hidden size")
        return Bridge(first, last, weight=found["weight"])
    down, up = found.get("down"), found.get("up")
    if down is None or up is None:
        raise UserError(f"{path}: {name} needs both .down and .up (or one .weight)")
    if down.dim() != 2 or up.dim() != 2 or down.shape[0] != hidden_size or up.shape[1] != hidden_size \
            or down.shape[1] != up.shape[0]:
        raise UserError(f"{path}: {name} has shapes {tuple(down.shape)} and {tuple(up.shape)}, expected "
                        f"({hidden_size}, r) and (r, {hidden_size})")
    return Bridge(first, last, down=down, up=up)


def _profile_from(data, identity: dict, num_layers: int) -> LayerProfile | None:
    if data is None:
        return None
    layers = tuple(LayerScore(int(row["layer"]), float(row["block_influence"]), float(row["nll_increase"]))
                   for row in data["layers"])
    if [score.layer for score in layers] != list(range(num_layers)):
        raise ValueError(f"the layer profile must list each of the {num_layers} layers once, in order")
    if any(math.isnan(score.nll_increase) for score in layers):
        raise ValueError("an NLL increase in the layer profile is not a number")
    return LayerProfile(model=identity, corpus=str(data.get("corpus", "")), texts=int(data.get("texts", 0)),
                        late_from=int(data.get("late_from", 0)), layers=layers)


def calibrations_dir() -> Path:
    return cache_home() / "calibrations"


def cache_path(identity: dict) -> Path:
    """Where `d3 calibrate` writes the calibration of the model with `identity`: named by its architecture and its
    weight fingerprint, and the kind of weights it ran (one file per kind: `d3 calibrate --weights int4` does not
    replace the float32 one)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(identity.get("model_type") or "model"))
    key = f"{identity['num_layers']}L-{identity.get('hidden_size')}d-{float(identity.get('fingerprint') or 0):.6e}"
    kind = f"-{identity['weights']}" if identity.get("weights") else ""
    return calibrations_dir() / f"{name}-{key}{kind}.safetensors"


def find_calibration(identity: dict) -> Path | None:
    """The newest calibration in the user cache made for this model on the same kind of weights, else the newest
    made on another kind (the importance order and the bridges carry over: docs/PERFORMANCE.md measures what that
    costs), else the bundled one if it fits, else None. Files that are not calibrations, or are for other models,
    are passed over."""
    folder = calibrations_dir()
    candidates = []
    if folder.is_dir():
        for path in folder.glob("*.safetensors"):
            try:
                payload = read_header(path)
            except UserError:
                continue
            recorded = payload.get("model") or {}
            if identity_mismatch(recorded, identity) is None:
                same_kind = made_on(recorded) == made_on(identity)
                candidates.append((same_kind, path.stat().st_mtime, path))
    if candidates:
        return max(candidates)[-1]
    if BUNDLED_CALIBRATION.is_file():
        try:
            if identity_mismatch(read_header(BUNDLED_CALIBRATION)["model"], identity) is None:
                return BUNDLED_CALIBRATION
        except UserError:
            return None
    return None


def load_for_model(identity: dict, explicit: str | None) -> ModelCalibration | None:
    """The calibration to use for the model with `identity`: `explicit` (a UserError if it does not fit), else the
    one `find_calibration` finds, else None."""
    if explicit is not None:
        calibration = read_calibration(explicit)
        reason = identity_mismatch(calibration.model, identity)
        if reason is not None:
            raise UserError(f"the calibration {explicit} does not fit this model: {reason}; make one with "
                            "d3 calibrate")
        return calibration
    found = find_calibration(identity)
    if found is None:
        return None
    return read_calibration(found, bundled=found == BUNDLED_CALIBRATION)
