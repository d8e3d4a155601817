import pytest

from d3cli.core.errors import UserError
from d3cli.cli.options import parse_alphas, parse_list


def test_alphas_keep_their_order_without_repeats():
    assert parse_alphas("0.99, 0.98,0.99,") == (0.99, 0.98)


@pytest.mark.parametrize(("text", "message"), [
    ("0.98,fast", "--alpha takes numbers separated by commas"),
    (" , ", "--alpha needs at least one value"),
    ("0.98,1.5", r"alpha must lie in \(0, 1\], not 1.5"),
    ("0", r"alpha must lie in \(0, 1\], not 0"),
    ("nan", "alpha must be a number in"),
])
def test_a_bad_alpha_list_is_the_schedules_own_error(text, message):
    with pytest.raises(UserError, match=message):
        parse_alphas(text)


def test_lists_drop_blanks_and_spaces():
    assert parse_list(" d3, static+bridges,,") == ("d3", "static+bridges")
    assert parse_list(None) == ()
