"""The runtime's first act: check that this Python is 3.4 or later and has the standard
modules the runtime needs.

The zipapp's __main__.py (builder/bundle.py) calls require_python() before it imports
anything else, so this module must parse and run on any Python the device may have, 2.7
and 3.3 included: no syntax or module newer than those.

Debian's python3-minimal lacks several modules (json among them); name the package to
install instead of failing later with a bare ImportError.
"""

import sys

NEEDED = ("argparse", "binascii", "configparser", "fcntl", "gzip", "hashlib", "json", "logging",
          "mmap", "re", "shutil", "subprocess", "tarfile", "tempfile", "threading", "zipfile",
          "zlib")


OLDEST = (3, 4)


def require_python():
    # type: () -> None
    """Exit with a sentence, not a SyntaxError, on a Python older than 3.4 (exit code 5:
    this Python cannot run the runtime)."""
    if tuple(sys.version_info[:2]) >= OLDEST:
        return
    sys.stderr.write(
        "resin-migrate needs Python %d.%d or later; this is Python %s (%s). Run it with "
        "python3 (Ubuntu 14.04 and Debian 8 have 3.4). Nothing was changed.\n" % (
            OLDEST[0], OLDEST[1], sys.version.split()[0], sys.executable or "unknown path"))
    sys.exit(5)


def missing_modules():
    # type: () -> list
    missing = []
    for name in NEEDED:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return missing


def require_modules():
    # type: () -> None
    """Exit with a clear message when a needed module is missing."""
    missing = missing_modules()
    if missing:
        version = "{}.{}".format(*sys.version_info[:2])
        sys.stderr.write(
            "resin-migrate: this Python {} lacks the standard modules: {}.\n"
            "It is probably Debian's python3-minimal. Install the full standard library "
            "with 'apt-get install libpython{}-stdlib' (or 'apt-get install python3'), "
            "then run this command again. Nothing was changed.\n".format(
                version, ", ".join(missing), version))
        sys.exit(5)
