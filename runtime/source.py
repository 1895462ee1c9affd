"""Where the bundle comes from: a directory on the device (--bundle) or a URL (--bundle-url).

Both give the manifest (and its exact bytes, which stage 1 copies onto flash-data), a
check of the streams before anything changes, and each stream to write: a local file
by path, a remote one as a reader (fetch.RemoteFile) that write_stream consumes as it
downloads. From a URL, the checks fetch only manifest.json and SHA256SUMS (and ask the
server each stream's size): no stream is downloaded before stage 1 writes it, and
nothing of it is stored on the device's disk.
"""

import os

from .bundle import verify_streams
from .errors import BundleError
from .fetch import Fetcher, join
from .manifest import MANIFEST_NAME, SUMS_NAME, Manifest, load, loads  # noqa: F401

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Any, Dict, Optional, Union  # noqa: F401  # novermin

    from .fetch import RemoteFile  # noqa: F401
    from .manifest import Stream  # noqa: F401


class LocalBundle(object):
    """A bundle directory on the device."""

    remote = False

    def __init__(self, directory):
        # type: (str) -> None
        self.location = directory
        self._manifest = None  # type: Optional[Manifest]

    def __str__(self):
        return self.location

    def manifest(self):
        # type: () -> Manifest
        if self._manifest is None:
            self._manifest = load(self.location)
        return self._manifest

    def manifest_bytes(self):
        # type: () -> bytes
        with open(os.path.join(self.location, MANIFEST_NAME), "rb") as handle:
            return handle.read()

    def check(self, manifest):
        # type: (Manifest) -> str
        """Every stream's size and sha256 (reads them whole); the check's description."""
        checked = self.verify_all(manifest)
        return "{} streams match manifest.json ({})".format(len(checked), ", ".join(checked))

    def verify_all(self, manifest):
        # type: (Manifest) -> list
        """`verify`: every stream read whole, its size and sha256 compared; the names."""
        return verify_streams(self.location, manifest)

    def stream_location(self, name):
        # type: (str) -> str
        return os.path.join(self.location, name)

    def open_stream(self, stream):
        # type: (Stream) -> Optional[RemoteFile]
        """None: write_stream opens a local file itself (and can hash it again)."""
        return None

    def to_state(self):
        # type: () -> Dict[str, Any]
        return {"bundle": os.path.abspath(self.location), "bundle_url": None}


class RemoteBundle(object):
    """A bundle directory served over HTTP(S): url is the directory's URL."""

    remote = True

    def __init__(self, url, fetcher):
        # type: (str, Fetcher) -> None
        self.location = url if url.endswith("/") else url + "/"
        self.fetcher = fetcher
        self._manifest = None  # type: Optional[Manifest]
        self._manifest_bytes = b""
        fetcher.check_url(self.location)

    def __str__(self):
        return self.location

    def manifest(self):
        # type: () -> Manifest
        """manifest.json, validated and checked against SHA256SUMS (fetched once)."""
        if self._manifest is None:
            url = join(self.location, MANIFEST_NAME)
            data = self.fetcher.get(url)
            manifest = loads(data, url)
            self._check_sums(data, manifest)
            self._manifest, self._manifest_bytes = manifest, data
        return self._manifest

    def manifest_bytes(self):
        # type: () -> bytes
        self.manifest()
        return self._manifest_bytes

    def _check_sums(self, data, manifest):
        # type: (bytes, Manifest) -> None
        import hashlib
        url = join(self.location, SUMS_NAME)
        sums = parse_sums(self.fetcher.get(url), url)
        expected = dict((stream.file, stream.sha256) for stream in manifest.streams)
        expected[MANIFEST_NAME] = hashlib.sha256(data).hexdigest()
        for name, digest in sorted(expected.items()):
            if sums.get(name) != digest:
                raise BundleError(
                    "{}: {} has sha256 {} there, {} says {}; the server holds files of "
                    "different builds (an upload under way?): publish the whole bundle "
                    "again".format(self.location, name, digest, SUMS_NAME,
                                   sums.get(name, "nothing")))

    def check(self, manifest):
        # type: (Manifest) -> str
        """Each stream is there at its size (HEAD); none is downloaded here."""
        ranges = True
        for stream in manifest.streams:
            url = join(self.location, stream.file)
            size, accepts = self.fetcher.size(url)
            if size != stream.size:
                raise BundleError("{}: the server has {} bytes, the manifest says {}; the "
                                  "server holds another build of it: publish the whole "
                                  "bundle again".format(url, size, stream.size))
            ranges = ranges and accepts
        return "manifest.json and {} match; {} streams on the server at their sizes ({}), " \
            "hashed as stage 1 writes them{}".format(
                SUMS_NAME, len(manifest.streams),
                ", ".join(stream.file for stream in manifest.streams),
                "" if ranges else "; the server does not announce range requests, so an "
                "interrupted download reads the stream from its start again")

    def verify_all(self, manifest):
        # type: (Manifest) -> list
        """`verify` from a URL: download every stream (into memory a chunk at a time,
        nothing stored) and compare its size and sha256; the names checked."""
        import hashlib
        checked = []
        for stream in manifest.streams:
            digest = hashlib.sha256()
            with self.open_stream(stream) as reader:
                while True:
                    data = reader.read(1 << 20)
                    if not data:
                        break
                    digest.update(data)
            if digest.hexdigest() != stream.sha256:
                raise BundleError("{}: sha256 {} differs from the manifest's {}; the file on "
                                  "the server is damaged: publish the bundle again".format(
                                      reader.url, digest.hexdigest(), stream.sha256))
            checked.append(stream.file)
        return checked

    def stream_location(self, name):
        # type: (str) -> str
        return join(self.location, name)

    def open_stream(self, stream):
        # type: (Stream) -> RemoteFile
        return self.fetcher.open(join(self.location, stream.file), stream.size)

    def to_state(self):
        # type: () -> Dict[str, Any]
        return {"bundle_url": self.location, "ca_file": self.fetcher.ca_file,
                "allow_http": self.fetcher.allow_http, "auth_file": self.fetcher.auth_file}


def parse_sums(data, where):
    # type: (bytes, str) -> Dict[str, str]
    """SHA256SUMS as sha256sum writes it: '<64 hex>  <name>' (or ' *<name>') per line."""
    sums = {}
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        digest, _, name = line.partition(" ")
        name = name[1:] if name.startswith((" ", "*")) else name
        if len(digest) != 64 or not name:
            raise BundleError("{}: line {} is not '<sha256>  <file>': {!r}".format(
                where, number, line[:80]))
        sums[name] = digest.lower()
    return sums


def bundle_source(bundle):
    # type: (Union[str, LocalBundle, RemoteBundle]) -> Union[LocalBundle, RemoteBundle]
    """A source as given, or the directory given as a path."""
    if isinstance(bundle, (LocalBundle, RemoteBundle)):
        return bundle
    return LocalBundle(bundle)


def recorded_source(record, retries=None):
    # type: (Any, Optional[int]) -> Optional[RemoteBundle]
    """The URL stage 1 started from, as its state file recorded it (a state.Record), or
    None."""
    url = record.bundle_url
    if not url:
        return None
    fetcher = Fetcher(ca_file=record.ca_file, allow_http=bool(record.allow_http),
                      auth_file=record.auth_file)
    if retries is not None:
        fetcher.retries = retries
    return RemoteBundle(url, fetcher)
