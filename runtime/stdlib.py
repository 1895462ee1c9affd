"""The runtime's first act: check that this Python has the standard modules it needs.

Debian's python3-minimal lacks several (json among them); name the package to
install instead of failing later with a bare ImportError.
"""

import sys

NEEDED = ("argparse", "binascii", "configparser", "fcntl", "gzip", "hashlib", "json", "logging",
          "mmap", "re", "shutil", "subprocess", "tarfile", "tempfile", "threading", "zipfile",
          "zlib")


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
