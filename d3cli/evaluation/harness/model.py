"""The lm-evaluation-harness model `d3`: generation decoded with D3 through d3's one engine, log-likelihoods scored
under the same schedule by d3's teacher-forced scorer.

    python -m d3cli.evaluation.harness --model d3 --model_args alpha=0.98,min_layers=0.84 --tasks gsm8k_cot
    accelerate launch --multi_gpu --num_processes N -m d3cli.evaluation.harness --model d3 ...   (data-parallel)

(On a machine without GPUs `--multi_gpu` still starts N processes, which meet over gloo; accelerate's `--cpu` flag
starts one process unless given an MPI hostfile.)

Model arguments are the options of `d3 generate`: `pretrained` (a Hugging Face id, folder or .gguf; default the
embedded model), `device`, `dtype`, `device_map`, `trust_remote_code`, `weights` (auto, float32, bfloat16, float16,
int8, int4), `group_size`, `alpha`, `min_layers`, `warmup`, `head`,
`tail`, `skip_order`, `profile`, `calibration`, `bridges`; and lm-eval's `batch_size`, `max_gen_toks`,
`max_length`. The model's calibration (importance order, bridges) is found as every d3 command finds it.

What D3 means for each request type:
- `generate_until`: the reply is decoded as `d3 generate` decodes it (the prompt prefilled at full depth, generated
  token i at floor(L·α^i) layers), stopped at lm-eval's `until` strings, EOS or `max_gen_toks`.
- `loglikelihood`: the continuation's tokens are scored as if D3 had generated them after the context: step i of
  the continuation at the depth of generated token i (exactly what cached D3 decoding computes; tests hold the two
  together). A one-token answer is therefore scored at full depth: multiple-choice tasks whose answers are a token
  or two measure D3 only as far as its first steps skip layers.
- `loglikelihood_rolling`: a document's tokens are generated tokens 0, 1, 2, … after the prefix token; for a
  document longer than the context, each later window's context is prefilled at full depth (D3 would have run
  those positions at their own depths), so beyond the first window the score approximates D3.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from d3cli.base.errors import UserError, check_at_least
from d3cli.core.decode.sampling import SamplingSettings
from d3cli.core.session.settings import DecodeSettings, apply_options

log = logging.getLogger("lm_eval.models.d3")  # lm-eval's logging setup shows its own loggers only

DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_MAX_LENGTH = 2048  # for a model whose config names no context length
DEPTH_ARGS = ("alpha", "min_layers", "warmup", "head", "tail", "skip_order", "profile", "bridges")
IGNORED_ARGS = {"max_batch_size"}  # lm-eval hands these to every model; d3 has no use for them


@register_model("d3")
class D3LM(TemplateLM):
    """lm-eval's model interface over a d3-loaded model and one D3 schedule."""

    def __init__(self, pretrained: str | None = None, device: str | None = None, dtype: str = "auto",
                 device_map: str | None = None, trust_remote_code: bool = False, weights: str = "auto",
                 group_size: int | str = 32, calibration: str | None = None,
                 batch_size: int | str = 1, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, max_length: int | None = None,
                 loaded=None, plan=None, **depth):
        """Either model arguments (what lm-eval passes: the model's, `calibration`, and the depth options of
        `DEPTH_ARGS`, checked as a JSONL line's are), or `loaded` (a loader.LoadedModel with its calibration) and
        `plan` (a plan.DecodePlan with any schedule: d3 bench's baselines) from d3 itself."""
        super().__init__()
        unknown = sorted(key for key in depth if key not in DEPTH_ARGS and key not in IGNORED_ARGS)
        if unknown:
            raise UserError(f"the d3 model takes no argument {', '.join(unknown)} (it takes the options of "
                            f"d3 generate: {', '.join(DEPTH_ARGS)}, calibration, ...)")
        base = DecodeSettings(max_new_tokens=int(max_gen_toks),
                              calibration=str(calibration) if calibration is not None else None)
        self.settings = apply_options(base, {key: value for key, value in depth.items() if key in DEPTH_ARGS})
        self.batch_size = 1 if batch_size in (None, "auto") else int(batch_size)
        check_at_least("batch_size", self.batch_size, 1)
        self.max_gen_toks = int(max_gen_toks)
        self._setup_processes()
        if loaded is None:
            from d3cli.core.model.loader import ModelOptions
            from d3cli.core.session.front_door import open_model

            if not str(group_size).isdigit():
                raise UserError(f"group_size must be a whole number (32, 64, 128 or 256), not {group_size}")
            options = ModelOptions(pretrained, self._device_name(device), dtype, device_map, bool(trust_remote_code),
                                   str(weights), int(group_size))
            loaded = open_model(options, self.settings).loaded
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        from d3cli.core.model.model_facts import context_length, num_decoder_layers
        from d3cli.core.session.plan import plan_for

        self.num_layers = num_decoder_layers(loaded.model)
        self.plan = plan if plan is not None else plan_for(loaded, self.settings)
        self.schedule = self.plan.schedule
        self._max_length = int(max_length) if max_length else (context_length(loaded.model) or DEFAULT_MAX_LENGTH)
        from d3cli.core.model.model_facts import model_device

        self._device = model_device(loaded.model)
        # What D3 did, for d3 bench's depth columns and matched baselines: per reply or scored continuation,
        # its token count and each token's layer count.
        self.records: list[dict] = []

    def _device_name(self, device: str | None) -> str:
        """d3's device name for lm-eval's `device`: lm-eval passes "cuda:0" when nobody chose one, so a CUDA device
        on a machine without CUDA means auto; "cuda:N" selects GPU N, and under accelerate each process takes its
        own GPU."""
        device = str(device or "auto")
        if not device.startswith("cuda"):
            return device
        if not torch.cuda.is_available():
            log.warning("d3: no CUDA GPU here: running on %s instead of %s", "auto", device)
            return "auto"
        index = int(device.partition(":")[2] or 0)
        if self.world_size > 1:
            index = self.rank % torch.cuda.device_count()
        torch.cuda.set_device(index)  # "cuda" below means this GPU
        return "cuda"

    # --- processes (accelerate launch) -------------------------------------------------------------------------

    def _setup_processes(self) -> None:
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return
        from accelerate import PartialState

        # cpu=True is what makes accelerate join CPU processes (gloo); it only says so when asked
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self._rank, self._world_size = self.state.process_index, self.state.num_processes

    def all_gather(self, tensor):
        if self.world_size <= 1:
            return tensor
        from accelerate.utils import gather

        return gather(tensor.to(self.state.device))

    def gather_object(self, obj, dst=0):
        if self.world_size <= 1:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.world_size > 1:
            self.state.wait_for_everyone()

    def _log_share(self, count: int, kind: str) -> None:
        log.info("d3: process %d of %d: %d %s requests", self.rank + 1, self.world_size, count, kind)

    # --- tokens ------------------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        if self.tokenizer.eos_token_id is not None:
            return int(self.tokenizer.eos_token_id)
        from d3cli.core.decode.engine import eos_token_ids

        return min(eos_token_ids(self.loaded.model, self.tokenizer))

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "d3")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # --- log-likelihoods ---------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Each ((context, continuation), context_ids, continuation_ids) scored under the schedule; requests that
        share a context reuse its prefill."""
        self._log_share(len(requests), "loglikelihood")
        order = sorted(range(len(requests)), key=lambda index: (tuple(requests[index][1]), index))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        previous = None
        for index in tqdm(order, disable=disable_tqdm or self.rank != 0, desc="Scoring with D3"):
            request, context_ids, continuation_ids = requests[index]
            scorer = self._scorer(context_ids, continuation_ids, previous)
            logprob, greedy = self._score(scorer, 0)
            results[index] = (logprob, greedy)
            self.cache_hook.add_partial("loglikelihood", request, (logprob, greedy))
            previous = scorer
        return results

    def _scorer(self, context_ids: Sequence[int], continuation_ids: Sequence[int], previous=None):
        """A scorer of the continuation after the context, both cut (from the left) to fit the model's window; the
        previous scorer's prefilled cache is reused when its prompt is the same."""
        from d3cli.evaluation.scoring import ContinuationScorer, ScoringText

        continuation = tuple(continuation_ids[-self.max_length:])
        context = tuple(context_ids[-(self.max_length + 1 - len(continuation)):])
        scorer = ContinuationScorer(self.loaded.model, ScoringText("lm-eval", context, continuation))
        if previous is not None and previous.text.prompt_ids == context:
            scorer.cache = previous.cache
        return scorer

    def _score(self, scorer, first_step: int) -> tuple[float, bool]:
        """The continuation's log-probability and whether greedy decoding would produce it, its tokens being the
        schedule's generated tokens `first_step`, `first_step` + 1, …"""
        from d3cli.evaluation.scoring import plan_for_schedule

        steps = scorer.text.steps
        if self.schedule.is_full_depth():
            nll, top = scorer.score()
        else:
            plan = plan_for_schedule(self.schedule, first_step + steps)[:, first_step:]
            nll, top = scorer.score(plan, bridges=self.schedule.bridge_maps)
        layers = [self.schedule.layers_at(step) for step in range(first_step, first_step + steps)]
        self.records.append({"tokens": steps, "layers": layers})
        targets = torch.tensor(scorer.text.continuation_ids)
        return -float(nll.sum()), bool(torch.equal(top, targets))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        self._log_share(len(requests), "loglikelihood_rolling")
        results = []
        for (string,) in tqdm([request.args for request in requests], disable=disable_tqdm or self.rank != 0,
                              desc="Scoring documents with D3"):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1))
            total, first_step = 0.0, 0
            for context, continuation in windows:
                logprob, _ = self._score(self._scorer(context, continuation), first_step)
                total += logprob
                first_step += len(continuation)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return results

    # --- generation --------------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, when a task asks, sampled) replies decoded with D3, cut at the task's `until` strings."""
        from d3cli.core.decode import engine

        self._log_share(len(requests), "generate_until")
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Generating with D3")
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            settings = self._settings_for(kwargs)
            max_context = self.max_length - settings.max_new_tokens
            if max_context < 1:
                raise UserError(f"max_gen_toks {settings.max_new_tokens} leaves no room for a prompt in the "
                                f"model's {self.max_length} positions")
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[index].args[0], left_truncate_len=max_context) for index in batch]
                replies = engine.decode(self.loaded, prompts, self.plan.for_settings(settings), stop=until)
                for index, reply in zip(batch, replies):
                    text = postprocess_generated_text(reply.text, until, None)
                    results[index] = text
                    self.records.append({"tokens": reply.generated_tokens, "layers": reply.layers_per_token})
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
                    progress.update(1)
        progress.close()
        return results

    def _settings_for(self, kwargs: dict) -> DecodeSettings:
        """The reply settings of one request's normalized generation arguments."""
        max_new_tokens = int(kwargs.pop("max_gen_toks"))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        sampling = SamplingSettings()
        if do_sample and temperature > 0:
            sampling = SamplingSettings(temperature=temperature, top_k=int(kwargs.pop("top_k", 0) or 0),
                                        top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
                                        seed=kwargs.pop("seed", None))
        for key in sorted(kwargs):
            log.warning("d3: generation argument %s=%r is not used", key, kwargs[key])
        return dataclasses.replace(self.settings, max_new_tokens=max_new_tokens, sampling=sampling)
