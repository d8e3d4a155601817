"""Streaming detokenization: the pieces of a reply join to exactly its text, a partial UTF-8 character and the start
of a possible stop string are held back (nothing printed is ever taken back), and a stop string ends the text."""

from __future__ import annotations

import pytest

from d3cli.core.text.detokenize import REPLACEMENT_CHAR, ReplyText, StreamingDetokenizer, _held_back_length

TEXT = "Héllo wörld 🙂 日本語 — done."  # 日 and 語 are split over three byte tokens each by SmolLM2's tokenizer


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(reply: ReplyText, token_ids) -> list[str]:
    return [reply.add(token_id) for token_id in token_ids]


def test_pieces_join_to_the_decoded_text_and_never_show_half_a_character(tokenizer):
    token_ids = ids_of(tokenizer, TEXT)
    detokenizer = StreamingDetokenizer(tokenizer)
    pieces = [detokenizer.add(token_id) for token_id in token_ids]
    assert "".join(pieces) + detokenizer.flush() == tokenizer.decode(token_ids) == TEXT
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)
    assert pieces.count("") == 4  # two of the three byte tokens of 日 and of 語 wait for the third
    assert " 日" in pieces and "語" in pieces


def test_special_tokens_add_no_text(tokenizer):
    token_ids = [*ids_of(tokenizer, "Hi"), tokenizer.eos_token_id]
    detokenizer = StreamingDetokenizer(tokenizer)
    assert [detokenizer.add(token_id) for token_id in token_ids][-1] == ""
    assert detokenizer.flush() == ""


def test_an_unfinished_character_at_the_very_end_comes_out_at_flush(tokenizer):
    first_byte_of_ri = ids_of(tokenizer, " 日")[1]  # ' ' + the first of three bytes
    detokenizer = StreamingDetokenizer(tokenizer)
    assert detokenizer.add(ids_of(tokenizer, "Sun")[0]) == "Sun"
    assert detokenizer.add(first_byte_of_ri) == ""
    assert detokenizer.flush() == tokenizer.decode([first_byte_of_ri])  # what the tokenizer shows for it, at last
    assert detokenizer.flush() == ""


def test_a_stop_string_ends_the_text_before_it_even_across_tokens(tokenizer):
    token_ids = ids_of(tokenizer, "The answer is 42.\n\nUser: and more")
    reply = ReplyText(tokenizer, ["\n\nUser:"])
    pieces = stream(reply, token_ids)
    assert "".join(pieces) == "The answer is 42." == reply.final_text
    assert reply.stopped and reply.finish() == "" and reply.add(token_ids[0]) == ""
    assert reply.text.startswith("The answer is 42.\n\nUser:")  # the text decoded, stop string included


def test_what_could_start_a_stop_string_waits_until_it_cannot(tokenizer):
    reply = ReplyText(tokenizer, ["END"])
    printed = ""
    for token_id in ids_of(tokenizer, "Go to the EN"):
        printed += reply.add(token_id)
        assert reply.text.startswith(printed)
    assert printed == "Go to the " and not reply.stopped
    printed += "".join(stream(reply, ids_of(tokenizer, "TRANCE.")))
    assert printed == "Go to the ENTRANCE." == reply.final_text  # it was no stop string after all


def test_finish_releases_what_was_held_back(tokenizer):
    reply = ReplyText(tokenizer, ["END"])
    assert "".join(stream(reply, ids_of(tokenizer, "Almost E"))) == "Almost "
    assert reply.finish() == "E" and reply.final_text == "Almost E"


def test_without_stop_strings_everything_is_printed_at_once(tokenizer):
    token_ids = ids_of(tokenizer, "One, two.")
    reply = ReplyText(tokenizer, ["", ""])  # empty stop strings are no stop strings
    assert "".join(stream(reply, token_ids)) == "One, two." and reply.finish() == "" and not reply.stopped


def test_the_earliest_of_several_stop_strings_wins(tokenizer):
    reply = ReplyText(tokenizer, ["two", "One,"])
    assert "".join(stream(reply, ids_of(tokenizer, "Zero. One, two."))) == "Zero. "
    assert reply.final_text == "Zero. "


@pytest.mark.parametrize("text, stops, held", [
    ("Hello E", ["END"], 1),
    ("Hello EN", ["END"], 2),
    ("Hello END", ["END"], 0),  # a whole stop string is found, not held
    ("Hello", ["END"], 0),
    ("Hello EN", ["X", "ENTER", "NOPE"], 2),
    ("ab", ["b!", "ab!"], 2),  # the longest end that starts some stop string
    ("a", ["!"], 0),
    ("", ["END"], 0),
])
def test_held_back_length(text, stops, held):
    assert _held_back_length(text, stops) == held
