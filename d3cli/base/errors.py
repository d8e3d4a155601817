"""The one exception type for "the user asked for something wrong".

The CLI turns it into a single line on stderr and exit code 2. Anything else that escapes is a bug.
"""


class UserError(Exception):
    """A mistake the user can fix: a bad option value, a missing model, an unreadable file, a bad prompt."""


def check_at_least(name: str, value: object, least: int) -> None:
    """The one check of a whole-number option's lower bound (`--batch-size`, `--limit`, `max-new-tokens`...)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be a whole number, not {value!r}")
    if value < least:
        raise UserError(f"{name} must be at least {least}, not {value}")


class OutputClosed(Exception):
    """Whoever read standard output has gone (`d3 generate ... | head -c 20`): stop quietly."""
