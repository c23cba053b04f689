"""Files written whole or not at all (`pipeline.outputs.atomic`), as every output, the resume
state and the exported models are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.outputs.atomic import AtomicFile, write_atomic


def test_atomic_files_are_whole_or_absent(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, b"old", mode=0o600)
    assert path.read_bytes() == b"old" and path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(OSError, match="disk full"), AtomicFile(path) as out:
        out.file.write(b"half of the new")
        raise OSError("disk full")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["state.json"]
    with AtomicFile(path) as out:
        out.file.write(b"new")
        assert path.read_bytes() == b"old"  # in place only once complete
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["state.json"]


def test_atomic_files_get_the_permissions_of_new_files(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        shared = write_atomic(tmp_path / "shared.json", b"{}")
        private = write_atomic(tmp_path / "private.json", b"{}", mode=0o600)
        os.umask(0o077)
        strict = write_atomic(tmp_path / "strict.json", b"{}")
    finally:
        os.umask(old)
    assert shared.stat().st_mode & 0o777 == 0o644
    assert private.stat().st_mode & 0o777 == 0o600
    assert strict.stat().st_mode & 0o777 == 0o600


def test_the_temporary_is_hidden_beside_the_file(tmp_path: Path) -> None:
    out = AtomicFile(tmp_path / "masks.jsonl")
    assert out.temp.parent == tmp_path
    assert out.temp.name.startswith(".masks.jsonl.") and out.temp.name.endswith(".tmp")
    other = AtomicFile(tmp_path / "masks.jsonl")
    assert other.temp != out.temp  # two writers never share a temporary
    out.file.write(b"a")
    other.file.write(b"b")
    other.commit()
    out.discard()
    assert (tmp_path / "masks.jsonl").read_bytes() == b"b"
    assert os.listdir(tmp_path) == ["masks.jsonl"]
