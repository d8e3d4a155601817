"""GSM8K (test split, 1319 grade-school math problems), scored as lm-evaluation-harness's gsm8k_cot.

Few-shot chain of thought by default: 8 worked problems from the train split, at fixed indices, as
"Question: ...\nAnswer: ... The answer is N." blocks; or, with --chat, zero-shot through the model's chat template.
Strict: the number in "The answer is N."; flexible: the last number in the output. Both compare as numbers with
the gold after "####" (commas, "$" and a trailing ".0" or "." do not matter).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from d3cli.base.errors import UserError
from d3cli.evaluation.tasks.base import INVALID, Answer, Example, TaskOptions, read_jsonl, take

FEWSHOT_INDICES = (0, 1, 26, 28, 34, 35, 48, 69)  # short worked solutions from train.jsonl, in this order
CALCULATOR = re.compile(r"<<[^>]*>>")
STRICT = re.compile(r"The answer is (-?[0-9.,]+).")  # as gsm8k_cot's strict-match: a character must follow
FLEXIBLE = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")
CHAT_INSTRUCTION = ("Solve this problem step by step. End with \"The answer is N.\", where N is the final number."
                    "\n\n{question}")


def normalize_number(text: str) -> str:
    """"1,234.00" -> "1234"; "$5." -> "5"; anything that is not a number -> [invalid]."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return INVALID
    if not value.is_finite():
        return INVALID
    normalized = value.normalize()
    return f"{normalized:f}" if normalized != normalized.to_integral() else str(int(normalized))


def solution_text(answer: str) -> str:
    """A train answer as a worked solution: calculator notes dropped, "#### N" turned into "The answer is N."."""
    reasoning, _, gold = answer.partition("####")
    steps = " ".join(line.strip() for line in CALCULATOR.sub("", reasoning).splitlines() if line.strip())
    return f"{steps} The answer is {gold.strip()}."


class Gsm8kTask:
    name = "gsm8k"
    default_shots = 8
    stop_strings = ("Question:", "</s>", "<|im_end|>", "\n\n\n")

    def files(self, options: TaskOptions) -> list[str]:
        return ["gsm8k/test.jsonl"] + (["gsm8k/train.jsonl"] if self.shots(options) else [])

    def shots(self, options: TaskOptions) -> int:
        if options.chat:
            return 0
        shots = self.default_shots if options.shots is None else options.shots
        if not 0 <= shots <= len(FEWSHOT_INDICES):
            raise UserError(f"gsm8k takes 0 to {len(FEWSHOT_INDICES)} shots, not {shots}")
        return shots

    def examples(self, folder: Path, options: TaskOptions) -> list[Example]:
        if options.subtasks:
            raise UserError("gsm8k has no subtasks (--subtasks is for bbh)")
        shots = self.shots(options)
        prefix = ""
        if shots:
            train = read_jsonl(folder / "gsm8k" / "train.jsonl")
            if len(train) <= max(FEWSHOT_INDICES):
                raise UserError(f"{folder / 'gsm8k' / 'train.jsonl'} has {len(train)} rows: not the official train split")
            blocks = []
            for index in FEWSHOT_INDICES[:shots]:
                row = self._checked(train[index], folder / "gsm8k" / "train.jsonl")
                blocks.append(f"Question: {row['question']}\nAnswer: {solution_text(row['answer'])}")
            prefix = "\n\n".join(blocks) + "\n\n"
        examples = []
        path = folder / "gsm8k" / "test.jsonl"
        for number, row in enumerate(read_jsonl(path)):
            row = self._checked(row, path)
            gold = normalize_number(row["answer"].rpartition("####")[2])
            if options.chat:
                prompt = CHAT_INSTRUCTION.format(question=row["question"])
            else:
                prompt = f"{prefix}Question: {row['question']}\nAnswer:"
            reference = solution_text(row["answer"])
            examples.append(Example(f"gsm8k/{number}", prompt, gold, chat=options.chat,
                                    reference=reference if options.chat else f" {reference}"))
        return take(examples, options)

    @staticmethod
    def _checked(row: dict, path: Path) -> dict:
        line = row.get("_line")
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise UserError(f"{path}:{line}: needs \"question\" and \"answer\" strings")
        if "####" not in row["answer"]:
            raise UserError(f"{path}:{line}: the answer has no \"#### N\" gold number")
        return row

    def extract(self, output: str, example: Example) -> Answer:
        strict = STRICT.search(output)
        numbers = FLEXIBLE.findall(output)
        return Answer(
            strict=normalize_number(strict.group(1)) if strict else INVALID,
            flexible=normalize_number(numbers[-1]) if numbers else INVALID,
        )

    def is_correct(self, answer: str, example: Example) -> bool:
        return answer != INVALID and answer == example.gold
