"""Logging: timestamped lines to stderr at once, and to the log file once there is one.

Nothing is written to the device's disk before the checks pass (a refusal changes
nothing), so the records are buffered in memory until `open_file()` is called.
"""

import codecs
import io
import logging
import os
import sys

from .files import ENCODING

LOG_NAME = "resin-migrate"
LOG_PATH = "/var/log/resin-migrate.log"
FORMAT = "%(asctime)s %(levelname)s %(message)s"

log = logging.getLogger(LOG_NAME)


class _Buffer(logging.Handler):
    def __init__(self):
        logging.Handler.__init__(self)
        self.records = []  # type: list

    def emit(self, record):
        self.records.append(record)


_buffer = _Buffer()

# What the runtime prints or logs never fails on a character: under LANG=C, Python before
# 3.7 writes stdout and stderr in ASCII, and "strict" would end the run in a
# UnicodeEncodeError. A character the stream cannot encode is written as its escape
# (backslashreplace: \xe9), except a byte that a file or argument held but which was not
# UTF-8 (read with surrogateescape, files.py): that byte is written back as it was, as
# Python's own surrogateescape would.
OUTPUT_ERRORS = "resin-migrate-output"
_replaced = []  # type: list  # the streams wrapped anew: kept, so none closes the buffer


def _escape(error):
    # type: (UnicodeError) -> tuple
    if not isinstance(error, UnicodeEncodeError):
        raise error
    out = bytearray()
    for char in error.object[error.start:error.end]:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(code - 0xDC00)
        else:
            out += char.encode("ascii", "backslashreplace")
    return bytes(out), error.end


codecs.register_error(OUTPUT_ERRORS, _escape)


def tolerant_output():
    # type: () -> None
    """Make sys.stdout and sys.stderr escape what their encoding cannot write (the
    runtime's first act: nothing it prints may fail). Python 3.4 has no reconfigure(): the
    same buffer is wrapped anew, in the same encoding, line by line."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        buffer = getattr(stream, "buffer", None)
        if buffer is None or getattr(stream, "errors", "") == OUTPUT_ERRORS:
            continue    # not a standard stream (a test's capture), or already done
        stream.flush()
        _replaced.append(stream)
        setattr(sys, name, io.TextIOWrapper(
            buffer, encoding=stream.encoding or ENCODING, errors=OUTPUT_ERRORS,
            line_buffering=True))


class _FileHandler(logging.FileHandler):
    """The log file in UTF-8, whatever the locale, and never an error on what it holds
    (FileHandler takes errors= only from Python 3.9)."""

    def _open(self):
        return open(self.baseFilename, self.mode, encoding=ENCODING, errors=OUTPUT_ERRORS)


#: extra= of a progress line: on a terminal it replaces the previous progress line
PROGRESS = {"progress": True}


class _Console(logging.StreamHandler):
    """stderr. On a terminal, a progress line (logged with extra=PROGRESS) is rewritten in
    place until another line comes, so that a long write shows one line per stream; the
    log file and a pipe (a service, Ansible) get every line as it was logged."""

    def __init__(self):
        logging.StreamHandler.__init__(self)
        self.open_line = False

    def emit(self, record):
        terminal = getattr(self.stream, "isatty", lambda: False)()
        try:
            if getattr(record, "progress", False) and terminal:
                self.stream.write("\r\x1b[K" + self.format(record))
                self.stream.flush()
                self.open_line = True
                return
            if self.open_line:
                self.stream.write("\n")
                self.open_line = False
        except Exception:  # noqa: BLE001  (logging's own rule: never raise from emit)
            self.handleError(record)
            return
        logging.StreamHandler.emit(self, record)


def setup(verbose=False):
    # type: (bool) -> None
    log.setLevel(logging.DEBUG)
    console = _Console()
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    log.addHandler(_buffer)


def open_file(path):
    # type: (str) -> str
    """Start writing the log to path (appending), with everything logged so far."""
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory)
    handler = _FileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(FORMAT))
    for record in _buffer.records:
        handler.emit(record)
    log.removeHandler(_buffer)
    log.addHandler(handler)
    return path


def file_path():
    # type: () -> str
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.flush()
            return handler.baseFilename
    return ""
