"""Files the runtime replaces: written whole or not at all, and on the disk before it goes on."""

import os
import shutil

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Optional  # noqa: F401  # novermin


def write_atomic(path, text, mode_from=None):
    # type: (str, str, Optional[str]) -> None
    """Replace path with text: a temporary file beside it, fsync, rename, fsync the directory.

    mode_from: a file whose permissions the new one takes (default: path's own, if any).
    """
    temporary = path + ".resin-migrate.tmp"
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    model = mode_from or (path if os.path.exists(path) else None)
    if model is not None:
        shutil.copymode(model, temporary)
    os.rename(temporary, path)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
