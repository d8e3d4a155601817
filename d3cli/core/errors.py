"""The one exception type for "the user asked for something wrong".

The CLI turns it into a single line on stderr and exit code 2. Anything else that escapes is a bug.
"""


class UserError(Exception):
    """A mistake the user can fix: a bad option value, a missing model, an unreadable file, a bad prompt."""


class OutputClosed(Exception):
    """Whoever read standard output has gone (`d3 generate ... | head -c 20`): stop quietly."""
