"""Files the runtime replaces: written whole or not at all, and on the disk before it goes on."""

import os
import shutil

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Optional, Union  # noqa: F401  # novermin

# Every text file the runtime reads or writes (/etc/fstab, /var/lib/dpkg/status, the
# network configuration, its own state and log) is UTF-8, whatever the locale: Python
# before 3.7 would otherwise take the locale's encoding, ASCII under LANG=C, and fail on
# the first non-ASCII byte of dpkg's status. A file that is not UTF-8 (a Latin-1 SSID in
# wpa_supplicant.conf, an old fstab comment) is read with "surrogateescape": each byte
# that does not decode becomes a lone surrogate, matches nothing a parser looks for, and is
# encoded back to the same byte when the text is written (fstab edited and restored byte
# for byte, an SSID carried as its bytes). Never "strict" (a traceback on a byte the device
# holds) and never "replace" on what is written back (the byte would be lost). Text that is
# only shown goes through sys.stdout/stderr and the log, which write such a byte as it was
# and escape a character they cannot encode (runtime/log.py).
ENCODING = "utf-8"
ERRORS = "surrogateescape"


def decode(data):
    # type: (bytes) -> str
    """Bytes of a text file (or a tool's output) as text, by the rule above."""
    return data.decode(ENCODING, ERRORS)


def encode(text):
    # type: (str) -> bytes
    """Text as the bytes of a file, by the rule above (the bytes decode() read come back)."""
    return text.encode(ENCODING, ERRORS)


def read_text(path):
    # type: (str) -> str
    """The text of the file at path, by the rule above."""
    with open(path, "rb") as handle:
        return decode(handle.read())


def write_atomic(path, text, mode_from=None, mode=None):
    # type: (str, Union[str, bytes], Optional[str], Optional[int]) -> None
    """Replace path with text (str, encoded by the rule above, or bytes written as they
    are): a temporary file beside it, fsync, rename, fsync the directory.

    mode_from: a file whose permissions the new one takes (default: path's own, if any).
    mode: the permissions instead, which the temporary file has from its creation on (a
    file holding secrets is never readable by others, not even for a moment).
    """
    temporary = path + ".resin-migrate.tmp"
    if mode is not None and os.path.exists(temporary):
        os.unlink(temporary)    # O_EXCL below: created with mode, never reused
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (
        os.O_EXCL if mode is not None else 0), 0o666 if mode is None else mode)
    with os.fdopen(fd, "wb") as handle:
        if mode is not None:
            os.fchmod(fd, mode)     # whatever the umask took away
        handle.write(text if isinstance(text, bytes) else encode(text))
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
