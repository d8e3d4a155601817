"""Free-running fidelity: how a reply decoded under a schedule compares with the full-depth reply to the same prompt.

Teacher-forced numbers score the full-depth model's own text one token at a time; a reply is free-running: once one
token differs, every later token follows the skipped model's own words, and a weakened model may fall into a loop
that teacher forcing never shows. So for each prompt both replies are decoded greedily (same settings), and

    repetition        the share of repeated 4-grams in each reply (a loop repeats most of its 4-grams), and the
                      schedule's minus full depth's
    nll               the full-depth model's mean NLL per token of each reply: of its own, and of the other (how
                      far the other reply's words are from what the full model would write)
    first difference  the first position where the two replies differ (None when they are the same)
    answer            for a prompt with a check (a number, or a word, that must appear): whether each reply has it

`bench --task replies` reports these for every method over d3's built-in prompts (profiles/reply-prompts.json);
`d3 calibrate` measures them on prompts held out from the bridges' fit to choose the model's schedule
(schedule_choice.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from d3cli.core.decode.engine import decode, eos_token_ids
from d3cli.evaluation.builtin_prompts import ReplyPrompt, encoded
from d3cli.evaluation.scoring import ContinuationScorer, ScoringText

NGRAM = 4
LOOP_MARGIN = 0.05  # a reply loops where full depth's does not when its repetition exceeds full depth's by more


def repeated_share(token_ids: Sequence[int], n: int = NGRAM) -> float:
    """The share of a reply's n-grams that occurred earlier in it: 0 for no repetition, near 1 for a loop."""
    grams = [tuple(token_ids[index:index + n]) for index in range(len(token_ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def first_difference(first: Sequence[int], second: Sequence[int]) -> int | None:
    """The first position where two token sequences differ (the shorter one's length when one is a prefix of the
    other), None when they are equal."""
    for index, (a, b) in enumerate(zip(first, second)):
        if a != b:
            return index
    return None if len(first) == len(second) else min(len(first), len(second))


@dataclass(frozen=True)
class ReplyPair:
    """One prompt's full-depth reply and another one's, compared."""

    prompt_id: str
    full_text: str
    text: str
    full_tokens: int
    tokens: int
    mean_layers: float  # of the other reply
    repetition_full: float
    repetition: float
    nll_full: float | None  # the full-depth model's mean NLL per token of its own reply (None: an empty reply)
    nll: float | None  # ... of the other reply
    first_difference: int | None
    answer_full: bool | None
    answer: bool | None

    @property
    def delta_repetition(self) -> float:
        return self.repetition - self.repetition_full

    @property
    def delta_nll(self) -> float | None:
        return None if self.nll is None or self.nll_full is None else self.nll - self.nll_full

    @property
    def loops(self) -> bool:
        """Repeats itself where full depth does not (by more than LOOP_MARGIN of its 4-grams)."""
        return self.delta_repetition > LOOP_MARGIN

    def as_dict(self) -> dict:
        return {**asdict(self), "delta_repetition": self.delta_repetition, "delta_nll": self.delta_nll,
                "loops": self.loops}


def reply_tokens(reply, eos_ids: frozenset[int]) -> list[int]:
    """A reply's words: its token ids without the EOS token that ended it."""
    ids = list(reply.token_ids)
    return ids[:-1] if ids and reply.finish_reason == "eos" and ids[-1] in eos_ids else ids





def decode_replies(loaded, prompt_ids: Sequence[Sequence[int]], plan, batch_size: int = 8, on_reply=None) -> list:
    """The model's replies to every prompt under `plan`, decoded `batch_size` at a time."""
    replies = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = [list(ids) for ids in prompt_ids[start:start + batch_size]]
        for reply in decode(loaded, batch, plan):
            replies.append(reply)
            if on_reply is not None:
                on_reply()
    return replies


def full_depth_nll(loaded, prompt_ids: Sequence[int], continuation: Sequence[int]) -> float | None:
    """The full-depth model's mean NLL per token of `continuation` after `prompt_ids` (None for an empty one)."""
    if not continuation:
        return None
    text = ScoringText("reply", tuple(prompt_ids), tuple(continuation))
    return float(ContinuationScorer(loaded.model, text).score(None)[0].mean())  # one pass over the reply


@dataclass
class FullDepthReplies:
    """Each prompt's full-depth reply, with what the comparisons need of it (decoded and scored once)."""

    prompts: list[ReplyPrompt]
    prompt_ids: list[list[int]]
    replies: list
    tokens: list[list[int]]
    nll: list[float]
    repetition: list[float]


def full_depth_replies(loaded, prompts: Sequence[ReplyPrompt], plan, batch_size: int = 8,
                       on_reply=None) -> FullDepthReplies:
    """Decode and score the full-depth replies (`plan`: a full-depth DecodePlan with the reply settings)."""
    eos = eos_token_ids(loaded.model, loaded.tokenizer)
    prompt_ids = [encoded(loaded.tokenizer, prompt) for prompt in prompts]
    replies = decode_replies(loaded, prompt_ids, plan, batch_size, on_reply)
    tokens = [reply_tokens(reply, eos) for reply in replies]
    return FullDepthReplies(list(prompts), prompt_ids, replies, tokens,
                            [full_depth_nll(loaded, ids, words) for ids, words in zip(prompt_ids, tokens)],
                            [repeated_share(words) for words in tokens])


def compare_with(loaded, full: FullDepthReplies, plan, batch_size: int = 8, on_reply=None) -> list[ReplyPair]:
    """Each prompt's reply under `plan` against its full-depth reply."""
    eos = eos_token_ids(loaded.model, loaded.tokenizer)
    replies = decode_replies(loaded, full.prompt_ids, plan, batch_size, on_reply)
    pairs = []
    for index, (prompt, reply) in enumerate(zip(full.prompts, replies)):
        tokens = reply_tokens(reply, eos)
        same = tokens == full.tokens[index]
        pairs.append(ReplyPair(
            prompt_id=prompt.id, full_text=full.replies[index].text, text=reply.text,
            full_tokens=len(full.tokens[index]), tokens=len(tokens), mean_layers=reply.mean_layers,
            repetition_full=full.repetition[index], repetition=repeated_share(tokens),
            nll_full=full.nll[index],
            nll=full.nll[index] if same else full_depth_nll(loaded, full.prompt_ids[index], tokens),
            first_difference=first_difference(full.tokens[index], tokens),
            answer_full=prompt.check(full.replies[index].text), answer=prompt.check(reply.text)))
    return pairs


def summary(pairs: Sequence[ReplyPair]) -> dict:
    """The numbers of a set of reply pairs: mean and worst change in repetition, replies that loop where full
    depth's does not, mean change in the full-depth model's NLL, where replies leave full depth's path, answers."""
    nll = [pair.delta_nll for pair in pairs if pair.nll is not None and pair.nll_full is not None]
    differences = [pair.first_difference for pair in pairs if pair.first_difference is not None]
    checked = [pair for pair in pairs if pair.answer_full is not None]
    tokens = sum(pair.tokens for pair in pairs)
    return {
        "prompts": len(pairs),
        "mean_layers": sum(pair.mean_layers * pair.tokens for pair in pairs) / tokens if tokens else None,
        "repetition": statistics.fmean(pair.repetition for pair in pairs) if pairs else None,
        "repetition_full": statistics.fmean(pair.repetition_full for pair in pairs) if pairs else None,
        "delta_repetition": statistics.fmean(pair.delta_repetition for pair in pairs) if pairs else None,
        "worst_delta_repetition": max((pair.delta_repetition for pair in pairs), default=None),
        "loops": sum(pair.loops for pair in pairs),
        "delta_nll": statistics.fmean(nll) if nll else None,
        "identical": sum(pair.first_difference is None for pair in pairs),
        "median_first_difference": statistics.median(differences) if differences else None,
        "answers_checked": len(checked),
        "answers_full": sum(bool(pair.answer_full) for pair in checked),
        "answers": sum(bool(pair.answer) for pair in checked),
    }
