"""`d3 bench --task replies`: everyday prompts answered freely, each method's reply compared with full depth's.

The prompts are d3's own (profiles/reply-prompts.json, none of them a calibration prompt), asked through the chat
template and answered greedily at any length up to --max-new-tokens. Besides the usual columns the summary carries
each method's free-running fidelity (fidelity.py): its repeated 4-grams against full depth's (a reply that loops
where full depth's does not), the full-depth model's NLL of its replies against of its own, where replies leave full
depth's path, and, for prompts with a check (a number or a word a good reply contains), whether the answer stayed.
"""

from __future__ import annotations

import json
from pathlib import Path

from d3cli.base.errors import UserError
from d3cli.evaluation.builtin_prompts import ReplyPrompt, builtin_reply_prompts
from d3cli.evaluation.tasks.base import INVALID, Answer, Example, TaskOptions, take


class RepliesTask:
    name = "replies"
    default_shots = 0
    stop_strings = ()
    scores_replies = True  # each reply is scored by the full-depth model (bench.run_method)

    def files(self, options: TaskOptions) -> list[str]:
        return []  # built in

    def examples(self, folder: Path, options: TaskOptions) -> list[Example]:
        if options.subtasks:
            raise UserError("replies has no subtasks (--subtasks is for bbh)")
        if options.shots:
            raise UserError("replies takes no shots: its prompts are asked as they are")
        return take([Example(f"replies/{prompt.id}", prompt.text, self._gold(prompt), chat=prompt.kind == "chat")
                     for prompt in builtin_reply_prompts()], options)

    @staticmethod
    def _gold(prompt: ReplyPrompt) -> str:
        """The prompt's check as the example's gold ("" when it has none)."""
        if prompt.number is None and not prompt.words:
            return ""
        return json.dumps({"number": prompt.number, "words": list(prompt.words)})

    def extract(self, output: str, example: Example) -> Answer:
        if not example.gold:
            return Answer(INVALID, INVALID)
        check = json.loads(example.gold)
        prompt = ReplyPrompt(example.id, "chat", example.prompt, check["number"], tuple(check["words"]))
        verdict = "yes" if prompt.check(output) else "no"
        return Answer(verdict, verdict)

    def is_correct(self, answer: str, example: Example) -> bool:
        return answer == "yes"
