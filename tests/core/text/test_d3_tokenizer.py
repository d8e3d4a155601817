"""d3's own tokenizer (the `tokenizers` library alone) against transformers' tokenizer of the same model: token ids,
texts and chat renderings, beyond the probes d3_record.py checks before it records one."""

from __future__ import annotations

import copy

import jinja2
import pytest

from d3cli.core.model import d3_record, gguf_cache, loader
from d3cli.core.text.d3_tokenizer import D3Tokenizer, clean_up_tokenization, compile_template

TEXTS = ["", "a", "The quick brown fox jumps over the lazy dog.", "  leading and trailing spaces  ",
         "numbers 1234567890 and 3.14159", "code: def f(x):\n    return x ** 2\n", "emoji 🙂🚀 and CJK 日本語",
         "<|im_start|>user\nhi<|im_end|>", "tabs\tand\r\nwindows lines", "ünïcödé façade naïve café"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "And in German?"}],
]


@pytest.fixture(scope="module")
def pair(embedded):
    """transformers' tokenizer of the embedded model and d3's, built from what its start recorded."""
    folder = gguf_cache.cached_gguf_dir(loader.embedded_gguf_path())
    record = d3_record.read(folder)
    assert record is not None and "unsupported" not in record
    return embedded.tokenizer, D3Tokenizer(record["tokenizer"]["backend"], record["tokenizer"])


@pytest.mark.parametrize("text", TEXTS)
def test_the_same_ids_and_texts(pair, text):
    theirs, ours = pair
    for special in (True, False):
        ids = list(theirs(text, add_special_tokens=special)["input_ids"])
        assert ours(text, add_special_tokens=special)["input_ids"] == ids
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_the_same_chat_rendering_and_ids(pair, messages):
    theirs, ours = pair
    for generation in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False) == \
            theirs.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)
        ids = theirs.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert ours.apply_chat_template(messages, add_generation_prompt=generation) == list(ids)


def test_the_special_ids_and_a_copy(pair):
    theirs, ours = pair
    assert (ours.eos_token_id, ours.pad_token_id, ours.bos_token_id) == (theirs.eos_token_id, theirs.pad_token_id,
                                                                         theirs.bos_token_id)
    copied = copy.deepcopy(ours)
    assert copied is not ours and copied.encode("same text") == ours.encode("same text")


def test_templates_compile_as_transformers_compiles_them():
    """Trimmed blocks, the generation tag, tojson without HTML escaping, raise_exception, loop controls."""
    template = compile_template(
        "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no ' + m.role) }}{% endif %}"
        "{% if loop.index > 2 %}{% break %}{% endif %}\n"
        "{% generation %}{{ m.content | tojson }}{% endgeneration %}\n{% endfor %}")
    assert template.render(messages=[{"role": "u", "content": "<a&b>"}, {"role": "u", "content": "ü"},
                                     {"role": "u", "content": "dropped"}]) == '"<a&b>""ü"'
    with pytest.raises(jinja2.exceptions.TemplateError, match="no bad"):
        template.render(messages=[{"role": "bad", "content": ""}])
    with pytest.raises(jinja2.exceptions.SecurityError):
        compile_template("{% set ns = namespace(_x=1) %}").render()


def test_clean_up_is_transformers_clean_up():
    from transformers import PreTrainedTokenizerBase

    text = "Hello , world ! Is n't it ? I 'm sure it 's fine , we 've seen they 're . ' quoted ' "
    assert clean_up_tokenization(text) == PreTrainedTokenizerBase.clean_up_tokenization(None, text)
