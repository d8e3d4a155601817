"""What profile-ppl scores (evaluation/profile/corpus.py): continuations cut to fit, a task's reference answers, the
model's own greedy continuations, and the documents of a text or JSONL file."""

from __future__ import annotations

import re

import pytest
import torch

from d3cli.base.errors import UserError
from d3cli.core.model.loader import LoadedModel
from d3cli.evaluation.profile.corpus import file_texts, fit_to_context, read_documents, reference_texts, self_texts
from d3cli.evaluation.tasks.base import Example


def ids_of(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def test_a_continuation_is_cut_to_max_positions_and_to_the_context_left_after_the_prompt():
    continuation = list(range(10))
    assert fit_to_context([7, 8, 9], continuation, 4, None) == [0, 1, 2, 3]
    assert fit_to_context([7, 8, 9], continuation, 4, 6) == [0, 1, 2]  # 6 - 3 prompt tokens
    assert fit_to_context([7, 8, 9], continuation, 40, 20) == continuation
    assert fit_to_context([7, 8, 9], continuation, 4, 2) == []  # the prompt alone is too long


def test_reference_texts_are_each_prompt_then_its_reference_answer(tokenizer):
    examples = [Example("t/0", "Question: 2 + 2?\nAnswer:", "4", reference=" 2 + 2 = 4. The answer is 4."),
                Example("t/1", "Question: none?\nAnswer:", "1"),  # no reference: nothing to score
                Example("t/2", "Question: yes?\nAnswer:", "yes", reference=" yes")]  # one token: too short
    texts = reference_texts(tokenizer, examples, 5, None)
    assert [text.id for text in texts] == ["t/0"]
    assert list(texts[0].prompt_ids) == examples[0].prompt_ids(tokenizer)
    assert list(texts[0].continuation_ids) == ids_of(tokenizer, examples[0].reference, False)[:5]


def test_self_texts_are_the_models_greedy_full_depth_continuations(tiny_models, tokenizer):
    loaded = LoadedModel(tiny_models["llama"], tokenizer, "tiny")
    examples = [Example("t/0", "The river ran past the mill", ""), Example("t/1", "Once upon a time", "")]
    seen = []
    texts = self_texts(loaded, examples, (), 6, None, on_text=lambda: seen.append(1))
    assert [text.id for text in texts] == ["t/0", "t/1"] and len(seen) == 2
    for text, example in zip(texts, examples):
        assert list(text.prompt_ids) == example.prompt_ids(tokenizer) and text.steps == 6
        ids = torch.tensor([[*text.prompt_ids, *text.continuation_ids]])
        with torch.inference_mode():
            logits = loaded.model(input_ids=ids).logits[0]
        greedy = logits[len(text.prompt_ids) - 1:-1].argmax(-1).tolist()
        assert greedy == list(text.continuation_ids)  # each token the full-depth model's most likely next
    room = len(examples[1].prompt_ids(tokenizer)) + 1  # one position left: too few to profile
    assert [text.id for text in self_texts(loaded, examples, (), 6, room)] == []


def test_documents_are_blank_line_separated_or_jsonl_pairs(tmp_path):
    text_file = tmp_path / "docs.txt"
    text_file.write_text("First line\nsecond line\n\n\n   \nSecond doc\n\nThird\n", encoding="utf-8")
    assert read_documents(text_file) == [("First line\nsecond line", None), ("Second doc", None), ("Third", None)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "Q:", "continuation": " A."}\n{"prompt": "Q2:", "continuation": 3}\n',
                     encoding="utf-8")
    with pytest.raises(UserError, match=rf'^{re.escape(str(pairs))}:2: needs "prompt" and "continuation" strings$'):
        read_documents(pairs)
    pairs.write_text('{"prompt": "Q:", "continuation": " A."}\n', encoding="utf-8")
    assert read_documents(pairs) == [("Q:", " A.")]
    with pytest.raises(UserError, match=rf"^cannot read {re.escape(str(tmp_path / 'none.txt'))}: No such file"):
        read_documents(tmp_path / "none.txt")


def test_file_texts_split_each_document_after_its_prompt_tokens(tokenizer, tmp_path):
    long = "The river ran past the mill and under the old bridge, where children fished in summer."
    path = tmp_path / "docs.txt"
    path.write_text(f"{long}\n\nToo short.\n\n{long} Again.\n", encoding="utf-8")
    texts = file_texts(tokenizer, path, 4, 6, None)
    assert [text.id for text in texts] == ["docs.txt/0", "docs.txt/2"]  # numbered by document, the short one skipped
    ids = ids_of(tokenizer, long, True)
    assert (list(texts[0].prompt_ids), list(texts[0].continuation_ids)) == (ids[:4], ids[4:10])
    assert [text.id for text in file_texts(tokenizer, path, 4, 6, None, limit=1)] == ["docs.txt/0"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "Question: 2 + 2?", "continuation": " The answer is 4."}\n', encoding="utf-8")
    (text,) = file_texts(tokenizer, pairs, 4, 64, None)
    assert list(text.prompt_ids) == ids_of(tokenizer, "Question: 2 + 2?", True)
    assert list(text.continuation_ids) == ids_of(tokenizer, " The answer is 4.", False)
    with pytest.raises(UserError) as raised:
        file_texts(tokenizer, path, 40, 6, None)
    assert str(raised.value) == (f"{path} has no document longer than --prompt-tokens 40 plus 2 tokens (documents "
                                 "are separated by blank lines)")
    with pytest.raises(UserError, match=r"^--prompt-tokens must be at least 1, not 0$"):
        file_texts(tokenizer, path, 0, 6, None)
