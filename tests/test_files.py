"""fusellm.io.files: atomic writes leave whole files with the permissions `open` would give."""

from __future__ import annotations

import os
import stat

from fusellm.io.files import write_bytes_atomic, write_json_atomic


def test_atomic_writes_get_ordinary_permissions_and_leave_no_temporary(tmp_path):
    """mkstemp makes 0600 files: a work folder shared by several users or containers (the
    stage containers run as another user than the one that built the image) must not get them."""
    old = os.umask(0o022)
    try:
        written = write_bytes_atomic(tmp_path / "a" / "data.bin", b"x" * 10)
        record = write_json_atomic(tmp_path / "a" / "record.json", {"k": 1})
    finally:
        os.umask(old)
    for path in (written, record):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, oct(path.stat().st_mode)
    assert written.read_bytes() == b"x" * 10
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["data.bin", "record.json"]
