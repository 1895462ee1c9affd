"""Integrity of a bundle directory: every file the manifest names, at its size and sha256."""

import hashlib
import os

from .errors import BundleError
from .manifest import Manifest  # noqa: F401  (type comments)

CHUNK = 1 << 20


def sha256_file(path):
    # type: (str) -> tuple
    """(size, sha256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def verify_streams(bundle_dir, manifest):
    # type: (str, Manifest) -> list
    """Check each stream file against the manifest; return the names checked.

    Raises BundleError naming the first file that is missing, short, or altered.
    """
    checked = []
    for stream in manifest.streams:
        path = os.path.join(bundle_dir, stream.file)
        if not os.path.isfile(path):
            raise BundleError("{} is missing from the bundle; copy the whole bundle "
                              "directory again".format(path))
        size, digest = sha256_file(path)
        if size != stream.size:
            raise BundleError("{}: {} bytes, the manifest says {}; the copy is incomplete: "
                              "copy it again".format(path, size, stream.size))
        if digest != stream.sha256:
            raise BundleError("{}: sha256 {} differs from the manifest's {}; the file is "
                              "damaged: copy it again".format(path, digest, stream.sha256))
        checked.append(stream.file)
    return checked
