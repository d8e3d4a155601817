import os
import stat

import pytest

from d3cli.base.errors import UserError
from d3cli.base.files import write_atomically


def test_writes_the_content_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_atomically(target, "first\n", make_parents=True)
    write_atomically(target, b"second\n")
    assert target.read_bytes() == b"second\n"
    assert sorted(path.name for path in target.parent.iterdir()) == ["out.json"]


def test_the_file_gets_the_permissions_of_a_plain_write(tmp_path):
    previous = os.umask(0o022)
    try:
        write_atomically(tmp_path / "shared.json", "{}")
        os.umask(0o077)
        write_atomically(tmp_path / "private.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600


def test_a_folder_that_cannot_be_written_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot write"):
        write_atomically(tmp_path / "missing" / "out.json", "{}")
