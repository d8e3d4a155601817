"""BIG-Bench Hard: 27 subtasks, 6511 examples, scored as lm-evaluation-harness's bbh_cot_fewshot.

Each subtask's 3-shot chain-of-thought prompt from cot-prompts/ (its canary header stripped), then
"Q: <input>\nA: Let's think step by step.\n". Strict: what follows "the answer is " up to the final character
(the period); flexible: by the kind of answer, the last option "(X)", the last number, the last of the subtask's
labels (True/False, Yes/No, valid/invalid), or the words after the last "answer is".
"""

from __future__ import annotations

import re
from pathlib import Path

from d3cli.base.errors import UserError
from d3cli.core.session.settings import did_you_mean
from d3cli.evaluation.tasks.base import INVALID, Answer, Example, TaskOptions, read_json, take

OPTIONS, NUMBER, LABEL, FREE = "options", "number", "label", "free"
SUBTASKS = {
    "boolean_expressions": LABEL, "causal_judgement": LABEL, "date_understanding": OPTIONS,
    "disambiguation_qa": OPTIONS, "dyck_languages": FREE, "formal_fallacies": LABEL, "geometric_shapes": OPTIONS,
    "hyperbaton": OPTIONS, "logical_deduction_five_objects": OPTIONS, "logical_deduction_seven_objects": OPTIONS,
    "logical_deduction_three_objects": OPTIONS, "movie_recommendation": OPTIONS,
    "multistep_arithmetic_two": NUMBER, "navigate": LABEL, "object_counting": NUMBER,
    "penguins_in_a_table": OPTIONS, "reasoning_about_colored_objects": OPTIONS, "ruin_names": OPTIONS,
    "salient_translation_error_detection": OPTIONS, "snarks": OPTIONS, "sports_understanding": LABEL,
    "temporal_sequences": OPTIONS, "tracking_shuffled_objects_five_objects": OPTIONS,
    "tracking_shuffled_objects_seven_objects": OPTIONS, "tracking_shuffled_objects_three_objects": OPTIONS,
    "web_of_lies": LABEL, "word_sorting": FREE,
}
LABELS = {  # the answers of the label subtasks, as the targets spell them
    "boolean_expressions": ("True", "False"), "causal_judgement": ("Yes", "No"), "formal_fallacies": ("valid", "invalid"),
    "navigate": ("Yes", "No"), "sports_understanding": ("yes", "no"), "web_of_lies": ("Yes", "No"),
}
STRICT = re.compile(r"(?<=the answer is )(.*)(?=.)")
OPTION = re.compile(r"\(([A-R])\)")
NUMBER_PATTERN = re.compile(r"-?\d+(?:\.\d+)?")
ANSWER_IS = re.compile(r"answer is\s*(.*)", re.IGNORECASE)
COT_CUE = "A: Let's think step by step.\n"
CHAT_INSTRUCTION = ("Answer the question. Think step by step, then end with \"So the answer is X.\"\n\n{input}")


def strip_canary(text: str) -> str:
    """The prompt without the canary line and the "-----" line under it."""
    head, separator, body = text.partition("\n-----\n")
    return body if separator and "canary" in head.lower() else text


def few_shot_prefix(prompt: str, shots: int) -> str:
    """The task description and the first `shots` worked examples of a cot-prompts file."""
    description, *blocks = strip_canary(prompt).strip().split("\n\nQ: ")
    return "\n\nQ: ".join([description, *blocks[:shots]]) + "\n\n"


class BbhTask:
    name = "bbh"
    default_shots = 3
    stop_strings = ("\n\n", "Q:", "</s>", "<|im_end|>")

    def subtasks(self, options: TaskOptions) -> list[str]:
        for subtask in options.subtasks:
            if subtask not in SUBTASKS:
                raise UserError(f"unknown bbh subtask {subtask!r}{did_you_mean(subtask, SUBTASKS)} "
                                "(`d3 bench --task bbh --help` lists them)")
        return list(options.subtasks) or list(SUBTASKS)

    def files(self, options: TaskOptions) -> list[str]:
        files = []
        for subtask in self.subtasks(options):
            files.append(f"bbh/tasks/{subtask}.json")
            if not options.chat:
                files.append(f"bbh/cot-prompts/{subtask}.txt")
        return files

    def examples(self, folder: Path, options: TaskOptions) -> list[Example]:
        shots = 0 if options.chat else (self.default_shots if options.shots is None else options.shots)
        if not 0 <= shots <= 3:
            raise UserError(f"bbh prompts have 0 to 3 shots, not {shots}")
        examples = []
        for subtask in self.subtasks(options):
            path = folder / "bbh" / "tasks" / f"{subtask}.json"
            data = read_json(path)
            rows = data.get("examples") if isinstance(data, dict) else None
            if not isinstance(rows, list):
                raise UserError(f"{path}: expected an object with an \"examples\" list")
            prefix = ""
            if not options.chat:
                prompt_path = folder / "bbh" / "cot-prompts" / f"{subtask}.txt"
                try:
                    prefix = few_shot_prefix(prompt_path.read_text(encoding="utf-8"), shots)
                except (OSError, UnicodeDecodeError) as error:
                    raise UserError(f"cannot read {prompt_path}: {getattr(error, 'strerror', None) or error}") from None
            subtask_examples = []
            for number, row in enumerate(rows):
                if not isinstance(row, dict) or not isinstance(row.get("input"), str) or "target" not in row:
                    raise UserError(f"{path}: example {number} needs \"input\" and \"target\"")
                if options.chat:
                    prompt = CHAT_INSTRUCTION.format(input=row["input"])
                else:
                    prompt = f"{prefix}Q: {row['input']}\n{COT_CUE}"
                target = str(row["target"])
                subtask_examples.append(Example(f"bbh/{subtask}/{number}", prompt, target, chat=options.chat,
                                                subtask=subtask, reference=f"So the answer is {target}."))
            examples += take(subtask_examples, options)
        return examples

    def extract(self, output: str, example: Example) -> Answer:
        strict = STRICT.search(output)
        return Answer(strict.group(1).strip() if strict else INVALID, self._flexible(output, example.subtask))

    def _flexible(self, output: str, subtask: str) -> str:
        kind = SUBTASKS.get(subtask, FREE)
        if kind == OPTIONS:
            options = OPTION.findall(output)
            return f"({options[-1]})" if options else INVALID
        if kind == NUMBER:
            numbers = NUMBER_PATTERN.findall(output)
            return numbers[-1] if numbers else INVALID
        if kind == LABEL:
            labels = LABELS[subtask]
            found = re.findall(r"\b(" + "|".join(labels) + r")\b", output, flags=re.IGNORECASE)
            if not found:
                return INVALID
            return next(label for label in labels if label.lower() == found[-1].lower())
        stated = ANSWER_IS.findall(output)
        text = stated[-1] if stated else (output.strip().splitlines() or [""])[-1]
        return " ".join(text.strip().rstrip(".").split()) or INVALID

    def is_correct(self, answer: str, example: Example) -> bool:
        if answer == INVALID:
            return False
        if SUBTASKS.get(example.subtask) == FREE:
            return " ".join(answer.split()) == " ".join(example.gold.split())
        return answer == example.gold
