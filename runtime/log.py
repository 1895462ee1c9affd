"""Logging: timestamped lines to stderr at once, and to the log file once there is one.

Nothing is written to the device's disk before the checks pass (a refusal changes
nothing), so the records are buffered in memory until `open_file()` is called.
"""

import logging
import os

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


def setup(verbose=False):
    # type: (bool) -> None
    log.setLevel(logging.DEBUG)
    console = logging.StreamHandler()
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
    handler = logging.FileHandler(path)
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
