"""The front door to a loaded model: `open_model(ModelOptions, DecodeSettings) -> Session`.

Every command, the server and the lm-eval model enter here:

    open_model(options, settings)     loader.load (the model and its tokenizer, on its device and weights), its
                                      calibration attached (`attach_calibration`: the bundled one, the cache's, or
                                      --calibration; a --profile or --calibration of another model refused), and
                                      the DecodePlan of `settings` (plan.plan_for)
    session.encode(prompt)            token ids through the chat template or as raw text (prompts.encode_prompt)
    session.stream(prompts, plan)     the engine's events (engine.stream_decode), under the session's plan or another
    session.decode(prompts, plan)     the same, gathered into one Reply per prompt

A Session is immutable; `with_settings` gives the plan of other settings (a JSONL line's, a request's) on the same
loaded model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from d3cli.core.calibration.layer_profile import check_profile_matches, load_profile
from d3cli.core.calibration.model_calibration import load_for_model
from d3cli.core.decode import engine
from d3cli.core.decode.results import Reply
from d3cli.core.model.loader import LoadedModel, ModelOptions, load, model_identity
from d3cli.core.model.model_facts import model_device, model_dtype
from d3cli.core.session.plan import DecodePlan, plan_for
from d3cli.core.session.settings import DecodeSettings
from d3cli.core.text.prompts import encode_chat, encode_prompt


@dataclass(frozen=True)
class Session:
    """A loaded model (with its calibration), the settings it was opened with and their plan."""

    loaded: LoadedModel
    settings: DecodeSettings
    plan: DecodePlan

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def name(self) -> str:
        return self.loaded.name

    def plan_for(self, settings: DecodeSettings | None = None) -> DecodePlan:
        """The plan of `settings` (default: the session's) on this model."""
        return self.plan if settings is None or settings == self.settings else plan_for(self.loaded, settings)

    def with_settings(self, settings: DecodeSettings) -> Session:
        return dataclasses.replace(self, settings=settings, plan=self.plan_for(settings))

    def encode(self, prompt: str, chat: bool | None = None, system: str | None = None) -> list[int]:
        """`prompt`'s token ids: through the chat template (as the settings say, by default when the tokenizer has
        one) or as raw text."""
        chat = self.settings.chat if chat is None else chat
        system = self.settings.system if system is None else system
        return encode_prompt(self.tokenizer, prompt, chat, system)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def stream(self, prompts: Sequence[Sequence[int]], plan: DecodePlan | None = None,
               **options) -> Iterator[engine.TokenEvent]:
        """engine.stream_decode of token-id prompts under `plan` (default: the session's); `options` as it takes."""
        return engine.stream_decode(self.loaded, prompts, plan or self.plan, **options)

    def decode(self, prompts: Sequence[Sequence[int]], plan: DecodePlan | None = None, **options) -> list[Reply]:
        """engine.decode: one Reply per prompt (`on_event` sees every token; Ctrl-C keeps the partial replies)."""
        return engine.decode(self.loaded, prompts, plan or self.plan, **options)


def attach_calibration(loaded: LoadedModel, settings: DecodeSettings) -> LoadedModel:
    """`loaded` with its calibration (model_calibration.ModelCalibration, bridges on the model's device and dtype)
    or None; a --calibration or --profile file made for another model is a UserError."""
    identity = model_identity(loaded)
    if settings.profile is not None:
        check_profile_matches(load_profile(settings.profile), identity, settings.profile)
    calibration = load_for_model(identity, settings.calibration)
    if calibration is not None:
        calibration.activate(model_device(loaded.model), model_dtype(loaded.model))
    return loaded._replace(calibration=calibration)


def open_model(options: ModelOptions, settings: DecodeSettings | None = None, progress=None) -> Session:
    """Load the model of `options`, attach its calibration and plan `settings` on it (see the module docstring);
    `progress(done, total)` follows the decoder layers as they are built."""
    settings = settings if settings is not None else DecodeSettings()
    loaded = attach_calibration(load(options, progress=progress), settings)
    return Session(loaded, settings, plan_for(loaded, settings))


def session_of(loaded: LoadedModel, settings: DecodeSettings | None = None) -> Session:
    """A session around a model loaded already (its calibration attached as `open_model` would)."""
    settings = settings if settings is not None else DecodeSettings()
    loaded = attach_calibration(loaded, settings)
    return Session(loaded, settings, plan_for(loaded, settings))
