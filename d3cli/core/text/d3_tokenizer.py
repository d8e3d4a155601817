"""A model's tokenizer through the `tokenizers` library alone: what transformers' tokenizer does for d3, without
importing transformers (about 1.5 s of a warm start on two CPU cores; `tokenizers` imports in 0.02 s).

It is built from what d3_record.py recorded of transformers' own tokenizer for this model: the backend exactly as
transformers set it up (`backend_tokenizer.to_str()`: post-processor, added tokens and all), the special token ids,
the chat template and the strings the template sees. The record is made only after d3 checked, on probe texts and a
probe conversation, that this tokenizer gives transformers' token ids and rendering; tests/core/text/test_d3_tokenizer.py
holds them equal on more.

    tokenizer(text, add_special_tokens=True)["input_ids"]    the backend's encoding
    decode(ids, skip_special_tokens=...)                      the backend's decoding (+ transformers' clean-up where
                                                              the tokenizer asks for it and is not BPE)
    apply_chat_template(messages, add_generation_prompt=...)  the template rendered in transformers' sandboxed
                                                              jinja environment, then encoded without special tokens
"""

from __future__ import annotations

import json
from datetime import datetime


class D3Tokenizer:
    """See the module docstring. `facts` is the record's "tokenizer" entry."""

    def __init__(self, backend_json: str, facts: dict):
        from tokenizers import Tokenizer

        self._backend_json, self._facts = backend_json, facts
        self._tokenizer = Tokenizer.from_str(backend_json)
        self._tokenizer.encode_special_tokens = bool(facts.get("split_special_tokens", False))
        self.bos_token_id = facts.get("bos_token_id")
        self.eos_token_id = facts.get("eos_token_id")
        self.pad_token_id = facts.get("pad_token_id")
        self.chat_template = facts.get("chat_template")
        self.special_tokens_map = dict(facts.get("special_tokens_map", {}))
        self.clean_up_tokenization_spaces = bool(facts.get("clean_up_tokenization_spaces", False))
        self._template = None

    def __deepcopy__(self, memo):  # a fresh backend (a tokenizers object must not be shared between threads)
        return D3Tokenizer(self._backend_json, self._facts)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, token_ids, skip_special_tokens: bool = False) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        text = self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self._tokenizer.model).__name__ != "BPE":
            text = clean_up_tokenization(text)
        return text

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation through the chat template, as transformers renders it."""
        if not messages:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        if self._template is None:
            self._template = compile_template(self.chat_template)
        chat = [{key: value for key, value in message.items() if value is not None} for message in messages]
        return self._template.render(messages=chat, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.special_tokens_map)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True, **_):
        rendered = self.render_chat(messages, add_generation_prompt)
        return self.encode(rendered, add_special_tokens=False) if tokenize else rendered


def clean_up_tokenization(text: str) -> str:
    """transformers' clean-up of spaces before punctuation and contractions (a WordPiece-era decoding step)."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


def compile_template(source: str):
    """A chat template compiled as transformers compiles it: a sandboxed environment with trimmed blocks, loop
    controls, its `tojson` (no HTML escaping), `raise_exception`, `strftime_now`, `dict`, and `{% generation %}`
    blocks rendered as their body."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # jinja's own signature trick
            self, args = args[0], args[1:]
            attributes = dict(*args, **kwargs)
            for name in attributes:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attributes)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot store {name!r} on a namespace")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[Generation, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    environment.globals["dict"] = lambda *args, **kwargs: dict(*args, **kwargs)
    environment.globals["namespace"] = TemplateNamespace
    return environment.from_string(source)
