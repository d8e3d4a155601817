"""Teacher-forced scoring: the negative log-likelihood of a known continuation, at full depth or under a skip plan.

A continuation of C tokens after a prompt is scored in one forward pass. Its step s (s = 0 is the token the prompt's
prefill predicts) is predicted from the segment position s, whose input is the prompt's last token (s = 0) or
continuation token s - 1. A skip plan is a [layers, C] bool mask: plan[j, s] means step s skips layer j. Under a D3
schedule the plan is `plan_for_schedule`; `skipping.skipped_at_positions` applies it, and the test suite shows it
equals cached D3 decoding step for step. The prompt (but its last token) is prefilled once at full depth into a
cache that every plan reuses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from d3cli.core.decode.engine import cache_argument, generate_steps, make_prompt_batch, new_cache
from d3cli.core.decode.schedule import DecaySchedule
from d3cli.core.decode.skipping import skipped_at_positions, starting_at
from d3cli.core.model.kv_buffers import ReservingCache
from d3cli.core.model.model_facts import find_decoder_layers, model_device


@dataclass(frozen=True)
class ScoringText:
    """A prompt and the continuation whose tokens are scored."""

    id: str
    prompt_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]

    @property
    def steps(self) -> int:
        return len(self.continuation_ids)


def plan_for_schedule(schedule: DecaySchedule, steps: int) -> torch.Tensor:
    """The skip plan of decoding `steps` tokens with `schedule`: step s skips every layer not kept at step s."""
    plan = torch.zeros(schedule.num_layers, steps, dtype=torch.bool)
    for step in range(steps):
        kept = schedule.kept_layers(step)
        if len(kept) < schedule.num_layers:
            plan[:, step] = True
            plan[list(kept), step] = False
    return plan


def plan_skipping_one_layer(num_layers: int, layer: int, steps: int, late_from: int) -> torch.Tensor:
    """Layer `layer` alone skipped at every step from `late_from` on (a nested plan, so exact under a cache)."""
    plan = torch.zeros(num_layers, steps, dtype=torch.bool)
    plan[layer, late_from:] = True
    return plan


class ContinuationScorer:
    """Scores one `ScoringText` under any number of skip plans, prefilling its prompt only once."""

    def __init__(self, model, text: ScoringText):
        if not text.prompt_ids or not text.continuation_ids:
            raise ValueError("a scored text needs a prompt and a continuation")
        self.model = model
        self.text = text
        self.device = model_device(model)
        self.prefix_length = len(text.prompt_ids) - 1
        segment = (text.prompt_ids[-1], *text.continuation_ids[:-1])
        self.segment_ids = torch.tensor([segment], dtype=torch.long, device=self.device)
        self.segment_positions = torch.arange(self.prefix_length, self.prefix_length + text.steps,
                                              device=self.device)[None, :]
        self.targets = torch.tensor(text.continuation_ids, dtype=torch.long, device=self.device)
        self.cache: ReservingCache | None = None

    @torch.inference_mode()
    def _prefilled_cache(self) -> ReservingCache | None:
        if self.prefix_length == 0:
            return None
        if self.cache is not None and self.cache.crop_to(self.prefix_length):
            return self.cache
        self.cache = new_cache(self.model)
        prefix = torch.tensor([self.text.prompt_ids[:-1]], dtype=torch.long, device=self.device)
        self.model(input_ids=prefix, position_ids=torch.arange(self.prefix_length, device=self.device)[None, :],
                   **cache_argument(self.model, self.cache), use_cache=True, logits_to_keep=1)
        return self.cache

    @torch.inference_mode()
    def score(self, plan: torch.Tensor | None = None,
              observe: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None, bridges=None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Under `plan` (None: full depth) with `bridges` standing in for its skipped runs (None: plain skipping):
        each continuation token's NLL (nats, float32) and the model's most likely token at that step (what greedy
        decoding would pick there); both of shape [C]."""
        if plan is not None and plan.shape[1] != self.text.steps:
            raise ValueError(f"the plan covers {plan.shape[1]} steps, the continuation has {self.text.steps}")
        cache = self._prefilled_cache()
        if plan is not None:
            plan = plan.to(self.device)  # once, not once per layer inside the hooks
        with skipped_at_positions(self.model, plan, observe, bridges):
            output = self.model(input_ids=self.segment_ids, position_ids=self.segment_positions,
                                **cache_argument(self.model, cache), use_cache=cache is not None)
        log_probs = torch.log_softmax(output.logits[0].float(), dim=-1)
        return -log_probs.gather(-1, self.targets[:, None])[:, 0].cpu(), log_probs.argmax(-1).cpu()

    def nll_from(self, first_layer: int, hidden_in: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
        """`nll(plan)` for a plan that skips nothing before `first_layer`, running only the layers from there on:
        `hidden_in` is that layer's input at full depth (from an earlier `score(observe=...)`)."""
        self._prefilled_cache()  # now, with every layer in place: the forward below finds the prefix ready
        with starting_at(self.model, first_layer, hidden_in):
            return self.nll(plan)

    def nll(self, plan: torch.Tensor | None = None,
            observe: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None, bridges=None) -> torch.Tensor:
        """The NLL of each continuation token under `plan` (None: full depth); shape [C]."""
        return self.score(plan, observe, bridges)[0]

    def score_schedule(self, schedule: DecaySchedule) -> tuple[torch.Tensor, torch.Tensor]:
        """`score` as decoding with `schedule` would see it: its skip plan and its bridges."""
        if schedule.is_full_depth():
            return self.score()
        return self.score(plan_for_schedule(schedule, self.text.steps), bridges=schedule.bridge_maps)


def block_influence(model, scorer: ContinuationScorer, late_from: int, inputs: dict | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per layer, the mean of 1 - cos(input, output) over the steps from `late_from` on, and the full-depth NLL.

    Returns ([layers] float64 sums, [C] NLL, [C] top tokens): sums over the late steps, so callers can average
    over texts. `inputs`, if given, receives every layer's full-depth input (for `ContinuationScorer.nll_from`)."""
    totals = torch.zeros(len(find_decoder_layers(model)), dtype=torch.float64)

    def observe(layer: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        if inputs is not None:
            inputs[layer] = hidden_in.detach().clone()
        late_in, late_out = hidden_in[0, late_from:].float(), hidden_out[0, late_from:].float()
        if late_in.shape[0]:
            cosine = torch.nn.functional.cosine_similarity(late_in, late_out, dim=-1)
            totals[layer] += float((1.0 - cosine).sum())

    nll, top = scorer.score(None, observe)
    return totals, nll, top


def teacher_forced_nll(model, text: ScoringText, schedule: DecaySchedule) -> torch.Tensor:
    """The continuation's NLL through the real cached engine: decoding with a sampler that picks the reference."""
    targets = torch.tensor(text.continuation_ids, dtype=torch.long)
    device = model_device(model)

    chosen = 0

    def forced(logits: torch.Tensor) -> torch.Tensor:
        nonlocal chosen
        token = targets[min(chosen, len(targets) - 1)]
        chosen += 1
        return token.to(device).reshape(1)

    batch = make_prompt_batch([list(text.prompt_ids)], pad_token_id=0, device=device)
    nll = []
    for step in generate_steps(model, batch, schedule, forced, max_new_tokens=text.steps):
        log_probs = torch.log_softmax(step.logits[0], dim=-1)
        nll.append(-float(log_probs[targets[step.index]]))
    return torch.tensor(nll)


def mean_nll_under(model, texts: Sequence[ScoringText], schedules: Sequence[DecaySchedule]) -> list[float]:
    """Per schedule, the token-weighted mean NLL of `texts` (each text's prompt prefilled once for all)."""
    totals, count = [0.0] * len(schedules), 0
    for text in texts:
        scorer = ContinuationScorer(model, text)
        for index, schedule in enumerate(schedules):
            totals[index] += float(scorer.score_schedule(schedule)[0].sum())
        count += text.steps
    return [total / max(count, 1) for total in totals]
