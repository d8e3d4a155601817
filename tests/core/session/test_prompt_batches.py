import pytest

from d3cli.base.errors import UserError
from d3cli.core.decode.sampling import SamplingSettings
from d3cli.core.session.prompt_batches import PreparedPrompt, batches, comparison_seed
from d3cli.core.session.settings import DecodeSettings

BASE = DecodeSettings(alpha=0.9)
OTHER = DecodeSettings(alpha=0.8)


def prompts(*settings):
    return [PreparedPrompt([1, 2, number], each, line=number) for number, each in enumerate(settings, start=1)]


def lines(groups):
    return [[prompt.line for prompt in batch] for batch in groups]


def test_batches_keep_input_order_cap_their_size_and_split_where_settings_differ():
    given = prompts(BASE, BASE, BASE, OTHER, BASE)
    assert lines(batches(given, 2)) == [[1, 2], [3], [4], [5]]
    assert lines(batches(given, 8)) == [[1, 2, 3], [4], [5]]
    assert lines(batches(given, 1)) == [[1], [2], [3], [4], [5]]


def test_prompts_that_differ_only_in_their_format_share_a_batch():
    # the chat template and system message are in the token ids already; a reply length or stop string is not
    formatted = DecodeSettings(alpha=0.9, chat=False)
    with_system = DecodeSettings(alpha=0.9, system="Be brief.")
    longer = DecodeSettings(alpha=0.9, max_new_tokens=7)
    assert lines(batches(prompts(BASE, formatted, with_system, longer), 8)) == [[1, 2, 3], [4]]


def test_a_bad_line_lets_the_good_lines_before_it_decode_first():
    def stream():
        yield from prompts(BASE, BASE)
        raise UserError("line 3: not valid JSON")

    handed_out = []
    with pytest.raises(UserError, match="line 3"):
        for batch in batches(stream(), 4):
            handed_out.append([prompt.line for prompt in batch])
    assert handed_out == [[1, 2]]


def test_a_comparison_samples_both_runs_with_one_seed():
    assert comparison_seed(BASE) is None  # greedy: nothing to draw
    seeded = DecodeSettings(sampling=SamplingSettings(temperature=0.7, seed=11))
    assert comparison_seed(seeded) == 11
    unseeded = DecodeSettings(sampling=SamplingSettings(temperature=0.7))
    assert isinstance(comparison_seed(unseeded), int)
