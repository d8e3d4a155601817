"""Streaming detokenization: token ids in, printable text pieces out, stop strings honoured.

The pieces of one reply, joined, are exactly the reply's final text. A piece is held back while it ends in a partial
UTF-8 character (the tokenizer shows U+FFFD) or while its end could still become the start of a stop string, so
nothing is ever printed that must later be taken back.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT_CHAR = "\ufffd"


class StreamingDetokenizer:
    """Incremental decode that re-decodes only a short window of recent tokens per step."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append one token; return the new complete text it makes available (possibly empty)."""
        self.token_ids.append(token_id)
        settled = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        current = self._decode(self.token_ids[self.prefix_offset :])
        if len(current) > len(settled) and not current.endswith(REPLACEMENT_CHAR):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            return current[len(settled) :]
        return ""

    def flush(self) -> str:
        """The text still held back (an unfinished character at the very end), once no token follows."""
        settled = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        current = self._decode(self.token_ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return current[len(settled) :]


def _held_back_length(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper start of some stop string."""
    longest = 0
    for stop in stop_strings:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class ReplyText:
    """One reply's text as it streams: detokenizes, finds stop strings, and says what may be printed now."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.detokenizer = StreamingDetokenizer(tokenizer)
        self.stop_strings = [stop for stop in stop_strings if stop]
        self.text = ""  # everything decoded so far, stop string included once one appears
        self.emitted = 0  # how much of `text` has been handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append a token; return the text that is now safe to print. Sets `stopped` when a stop string appears."""
        if self.stopped:
            return ""
        searched_from = max(0, len(self.text) - max((len(s) for s in self.stop_strings), default=0))
        self.text += self.detokenizer.add(token_id)
        if self.stop_strings:
            hits = [index for stop in self.stop_strings if (index := self.text.find(stop, searched_from)) >= 0]
            if hits:
                self.stopped = True
                return self._emit_up_to(min(hits))
            return self._emit_up_to(len(self.text) - _held_back_length(self.text, self.stop_strings))
        return self._emit_up_to(len(self.text))

    def finish(self) -> str:
        """No more tokens: release whatever was held back (unless a stop string ended the reply)."""
        if self.stopped:
            return ""
        self.text += self.detokenizer.flush()
        return self._emit_up_to(len(self.text))

    def _emit_up_to(self, end: int) -> str:
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece

    @property
    def final_text(self) -> str:
        """The reply as printed: cut before the stop string if one ended it."""
        return self.text[: self.emitted] if self.stopped else self.text
