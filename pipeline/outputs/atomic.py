"""Files written whole or not at all: under a hidden temporary name beside the final one,
moved into place with ``os.replace`` once complete.

Same directory, so the replace is a rename, never a copy: a reader sees the whole file or
none, and a crash leaves at most a hidden ``.NAME.<random>.tmp`` (``remove_unfinished`` in
`pipeline.outputs.files` clears those of a run's outputs). Used by every output of a run, the
resume state and the exported models, so all of them behave alike.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Self


class AllOrNothing:
    """Output that is made whole or not at all: ``commit()`` puts it in place, ``discard()``
    removes every trace of it. As a context manager: committed when the block ends,
    discarded when it raises."""

    def commit(self) -> object:
        raise NotImplementedError

    def discard(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


class AtomicFile(AllOrNothing):
    """``path``'s contents, written into ``file`` (binary), in place at ``commit()``.

    ``mode``: the permissions, as for ``os.open``: the umask applies (0o666 gives what any
    new file gets, 0o644 under the usual umask). A writer that opens paths itself (FFmpeg,
    the ONNX exporter) writes ``temp`` instead of ``file``.
    """

    def __init__(self, path: str | os.PathLike[str], mode: int = 0o666) -> None:
        self.path = Path(path)
        # 64 random bits, and O_EXCL: never another writer's temporary. Not tempfile.mkstemp:
        # it makes the file 0600, and reading the umask to undo that sets it process-wide.
        self.temp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def commit(self) -> Path:
        """Close the file and move it to ``path``; returns ``path``."""
        try:
            self.file.close()
            os.replace(self.temp, self.path)
        except BaseException:
            # A full disk must not fill up further with a partial file each time it is tried.
            self.discard()
            raise
        return self.path

    def discard(self) -> None:
        """Close and delete the temporary file; ``path`` stays as it was."""
        self.file.close()
        self.temp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o666) -> Path:
    """``data`` as the whole of ``path`` (see `AtomicFile`); returns ``path``."""
    with AtomicFile(path, mode) as out:
        out.file.write(data)
    return out.path
