"""Files the runtime replaces: written whole or not at all, and on the disk before it goes on."""

import os
import shutil

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Optional, Union  # noqa: F401  # novermin


def write_atomic(path, text, mode_from=None, mode=None):
    # type: (str, Union[str, bytes], Optional[str], Optional[int]) -> None
    """Replace path with text (str, or bytes written as they are): a temporary file beside
    it, fsync, rename, fsync the directory.

    mode_from: a file whose permissions the new one takes (default: path's own, if any).
    mode: the permissions instead, which the temporary file has from its creation on (a
    file holding secrets is never readable by others, not even for a moment).
    """
    temporary = path + ".resin-migrate.tmp"
    if mode is not None and os.path.exists(temporary):
        os.unlink(temporary)    # O_EXCL below: created with mode, never reused
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (
        os.O_EXCL if mode is not None else 0), 0o666 if mode is None else mode)
    with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as handle:
        if mode is not None:
            os.fchmod(fd, mode)     # whatever the umask took away
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    model = None if mode is not None else mode_from or (path if os.path.exists(path) else None)
    if model is not None:
        shutil.copymode(model, temporary)
    os.rename(temporary, path)
    fsync_directory(os.path.dirname(path) or ".")


def fsync_directory(path):
    # type: (str) -> None
    """Make the directory's entries (renames, new and removed files) durable."""
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
