"""The migration bundle's manifest: its schema, defined once.

The builder writes manifest.json with `dumps()`; the runtime reads it with `load()`,
which validates every value against a strict pattern, so that nothing read from it
can carry shell or GRUB syntax into the commands and files the runtime writes.
"""

import json
import os
import re

from .errors import ManifestError
from .layout import LABEL_PATTERN, Layout, LayoutError

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Any  # noqa: F401  # novermin

SCHEMA_VERSION = 4
# The resinOS image is packed as the bytes of its block map only (what its filesystems
# use, plus everything outside them), in extents aligned to EXTENT_ALIGN; its first
# HEAD_BYTES (MBR, GRUB's core.img, the table) are always in the first extent, which
# stage 2 writes last.
EXTENT_ALIGN = 1 << 20
HEAD_BYTES = 4 << 20
MANIFEST_NAME = "manifest.json"
SUMS_NAME = "SHA256SUMS"
RUNTIME_NAME = "resin-migrate.pyz"

COMPRESSIONS = ("gzip", "zstd")
FILE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PATH_PATTERN = re.compile(r"^(/[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}){1,16}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")
# Kernel arguments end up in a GRUB script: words of plain characters only.
CMDLINE_PATTERN = re.compile(r"^[A-Za-z0-9._=/:,+-]+( [A-Za-z0-9._=/:,+-]+)*$")
FS_PATTERN = re.compile(r"^(ext4|vfat)$")
# A kernel argument the builder dropped from the flasher's entry: GRUB variables included.
DROPPED_ARG_PATTERN = re.compile(r"^[A-Za-z0-9._=/:,+${}-]{1,128}$")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# What the builder changed in the flasher, in words (never rendered into a script).
EDIT_PATTERN = re.compile(r"^[A-Za-z0-9 ._/:,()+=@'-]{1,240}$")


def _text(pattern):
    def check(value, where):
        if not isinstance(value, str) or not pattern.match(value):
            raise ManifestError("{}: {!r} does not match the pattern {}".format(
                where, value, pattern.pattern))
        return value
    return check


def _choice(options):
    def check(value, where):
        if value not in options:
            raise ManifestError("{}: expected one of {}, found {!r}".format(
                where, ", ".join(options), value))
        return value
    return check


def _count(value, where):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ManifestError("{}: expected a non-negative integer, found {!r}".format(
            where, value))
    return value


def _flag(value, where):
    if not isinstance(value, bool):
        raise ManifestError("{}: expected true or false, found {!r}".format(where, value))
    return value


def _optional(check):
    def wrapped(value, where):
        return None if value is None else check(value, where)
    return wrapped


def _list_of(check):
    def wrapped(value, where):
        if not isinstance(value, list):
            raise ManifestError("{}: expected a list, found {!r}".format(where, value))
        return [check(item, "{}[{}]".format(where, index)) for index, item in enumerate(value)]
    return wrapped


def _extent(value, where):
    if not isinstance(value, list) or len(value) != 3:
        raise ManifestError("{}: expected [start, length, sha256] (bytes), found {!r}".format(
            where, value))
    start, length = _count(value[0], where + "[0]"), _count(value[1], where + "[1]")
    digest = _text(SHA256_PATTERN)(value[2], where + "[2]")
    if start % 512 or length % 512 or not length:
        raise ManifestError("{}: [{}, {}] is not a non-empty whole number of 512-byte "
                            "sectors".format(where, start, length))
    return [start, length, digest]


def _layout(value, where):
    try:
        return Layout.from_dict(value, where)
    except LayoutError as exc:
        raise ManifestError(str(exc)) from exc


class Record(object):
    """A JSON object with a fixed set of checked fields.

    FIELDS lists (name, check); a check takes (value, where) and returns the value
    to keep, or raises ManifestError naming `where`.
    """

    FIELDS = ()  # type: tuple

    def __init__(self, **values):
        names = [name for name, _ in self.FIELDS]
        unknown = set(values) - set(names)
        if unknown:
            raise TypeError("unknown fields: " + ", ".join(sorted(unknown)))
        for name in names:
            setattr(self, name, values.get(name))

    @classmethod
    def from_dict(cls, data, where):
        if not isinstance(data, dict):
            raise ManifestError("{}: expected an object, found {!r}".format(where, data))
        values = {}
        for name, check in cls.FIELDS:
            if name not in data:
                raise ManifestError("{}: the field '{}' is missing".format(where, name))
            values[name] = _from_json(check, data[name], "{}.{}".format(where, name))
        return cls(**values)

    def to_dict(self):
        return dict((name, _to_json(getattr(self, name))) for name, _ in self.FIELDS)

    def __getattr__(self, name):
        # type: (str) -> Any
        # Only reached for names that are not fields (fields are set in __init__); it
        # tells type checkers that records carry attributes named by FIELDS.
        raise AttributeError("{} has no field {}".format(type(self).__name__, name))

    def validate(self, where):
        """Check the values as from_dict would; the builder calls it before writing."""
        type(self).from_dict(self.to_dict(), where)

    def __eq__(self, other):
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    def __ne__(self, other):
        return not self == other

    def __repr__(self):
        return "{}({!r})".format(type(self).__name__, self.to_dict())


def _from_json(check, value, where):
    if isinstance(check, type) and issubclass(check, Record):
        return check.from_dict(value, where)
    return check(value, where)


def _to_json(value):
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, Layout):
        return value.to_dict()
    if isinstance(value, list):
        return [_to_json(item) for item in value]
    return value


class Stream(Record):
    """A compressed file of the bundle and the raw bytes it expands to."""

    FIELDS = (
        ("file", _text(FILE_PATTERN)),
        ("compression", _choice(COMPRESSIONS)),
        ("size", _count),
        ("sha256", _text(SHA256_PATTERN)),
        ("raw_size", _count),
        ("raw_sha256", _text(SHA256_PATTERN)),
    )


class DevicePartition(Record):
    """A partition stage 1 creates in the swap area, in the order it creates them."""

    FIELDS = (
        ("label", _text(LABEL_PATTERN)),
        ("fs", _text(FS_PATTERN)),
        ("size", _count),              # bytes; for the growing partition, its minimum
        ("flags", _list_of(_choice(("boot", "lba")))),
        ("grows", _flag),              # takes the rest of the swap area
        ("stream", _optional(_text(FILE_PATTERN))),  # None: created empty and formatted
    )


class InnerImage(Record):
    """The resinOS image inside flash-rootA, as stage 2 finds and writes it.

    The file at `path` holds the image's extents one after the other, compressed: it
    expands to stream_size bytes with sha256 stream_sha256, and stage 2 writes each
    extent at its offset. What lies between extents is free space of a filesystem.
    """

    FIELDS = (
        ("path", _text(PATH_PATTERN)),           # in flash-rootA, compressed
        ("original_path", _text(PATH_PATTERN)),  # where the flasher had it raw
        ("compression", _choice(COMPRESSIONS)),
        ("size", _count),                        # the compressed file
        ("sha256", _text(SHA256_PATTERN)),
        ("raw_size", _count),                    # the whole image, as the flasher had it
        ("raw_sha256", _text(SHA256_PATTERN)),
        ("stream_size", _count),                 # its extents, as the file expands
        ("stream_sha256", _text(SHA256_PATTERN)),
        ("extents", _list_of(_extent)),          # [start, length, sha256], in order
        ("layout", _layout),
        ("data_free", _count),     # bytes free in its resin-data: room for the backup
    )

    def check_extents(self, where):
        """In order, apart, aligned, inside the image, the first exactly the first 4 MiB."""
        extents = self.extents
        if not extents or extents[0][0] != 0 or extents[0][1] != HEAD_BYTES:
            raise ManifestError("{}.extents: the first extent must be the first {} bytes "
                                "(written last)".format(where, HEAD_BYTES))
        end = 0
        for index, (start, length, _) in enumerate(extents):
            tail = index == len(extents) - 1 and start + length == self.raw_size
            if start < end or start % EXTENT_ALIGN or (length % EXTENT_ALIGN and not tail):
                raise ManifestError("{}.extents[{}]: [{}, {}] overlaps the one before or is "
                                    "not aligned to {} bytes".format(
                                        where, index, start, length, EXTENT_ALIGN))
            end = start + length
        if end > self.raw_size:
            raise ManifestError("{}.extents: they end at byte {}, beyond the image ({} "
                                "bytes)".format(where, end, self.raw_size))
        total = sum(extent[1] for extent in extents)
        if total != self.stream_size:
            raise ManifestError("{}.extents: they add up to {} bytes, stream_size is {}".format(
                where, total, self.stream_size))


class Boot(Record):
    """How GRUB boots the flasher: its kernel (and initrd), where they are, and its arguments.

    cmdline is the flasher entry's arguments without what means nothing outside its own
    GRUB (its ${...} variables) and without what would hide stage 2 (console=null, quiet,
    splash): dropped_args lists what was taken out, added_args what was put in instead.
    """

    FIELDS = (
        ("kernel_label", _text(LABEL_PATTERN)),  # the partition holding the kernel
        ("kernel", _text(PATH_PATTERN)),
        # the kernel's bytes: stage 1 proves the device's own GRUB reads them (grub-fstest)
        ("kernel_size", _count),
        ("kernel_sha256", _text(SHA256_PATTERN)),
        # a stream: a small filesystem made like the kernel's, with a file at the kernel's
        # path whose sha256 is probe_sha256; `check` reads it with the device's GRUB
        # (grub-fstest) before anything changes (builder/kernelprobe.py)
        ("probe", _text(FILE_PATTERN)),
        ("probe_sha256", _text(SHA256_PATTERN)),
        ("initrd", _optional(_text(PATH_PATTERN))),
        ("cmdline", _text(CMDLINE_PATTERN)),
        ("dropped_args", _list_of(_text(DROPPED_ARG_PATTERN))),
        ("added_args", _list_of(_text(CMDLINE_PATTERN))),
    )


class Flasher(Record):
    """The flasher the bundle was built from, as the builder recognised it, and what the
    builder changed in it so that stage 2, and only stage 2, runs when it boots."""

    FIELDS = (
        ("release", _text(VERSION_PATTERN)),      # os-release VERSION (the host OS's)
        ("meta_balena", _optional(_text(VERSION_PATTERN))),
        ("machine", _text(NAME_PATTERN)),         # genericx86-64, genericx86-64-ext
        ("slug", _text(NAME_PATTERN)),            # device-type.json: intel-nuc, ...
        ("shape", _text(VERSION_PATTERN)),        # the release shape recognised
        ("flag_file", _text(PATH_PATTERN)),       # on flash-boot
        ("edits", _list_of(_text(EDIT_PATTERN))),
    )


class Source(Record):
    """The flasher image the bundle was built from."""

    FIELDS = (
        ("name", _text(FILE_PATTERN)),
        ("format", _choice(("raw", "zip", "gzip", "zstd", "xz"))),
        ("sha256", _text(SHA256_PATTERN)),
    )


class Manifest(Record):
    """manifest.json: everything the runtime and stage 2 need to know about the bundle."""

    FIELDS = (
        ("schema", _count),
        ("builder_version", _text(VERSION_PATTERN)),
        ("source", Source),
        ("partitions", _list_of(lambda value, where: DevicePartition.from_dict(value, where))),
        ("streams", _list_of(lambda value, where: Stream.from_dict(value, where))),
        ("inner_image", InnerImage),
        ("boot", Boot),
        ("flasher", Flasher),
        ("flasher_decompressors", _list_of(_choice(COMPRESSIONS))),
        # the fleet's NetworkManager keyfiles (builder --network) on flash-boot, by name
        ("network_files", _list_of(_text(FILE_PATTERN))),
    )

    @classmethod
    def from_dict(cls, data, where="manifest"):
        if isinstance(data, dict) and data.get("schema") != SCHEMA_VERSION:
            raise ManifestError(
                "{}: schema version {!r} is not the one this runtime reads ({}); use the "
                "resin-migrate.pyz from the same bundle".format(
                    where, data.get("schema"), SCHEMA_VERSION))
        manifest = super(Manifest, cls).from_dict(data, where)
        manifest.check_consistent(where)
        return manifest

    def check_consistent(self, where="manifest"):
        """Cross-field rules: every stream named is listed, one partition grows, labels unique."""
        streams = dict((stream.file, stream) for stream in self.streams)
        if len(streams) != len(self.streams):
            raise ManifestError("{}.streams: a file is listed twice".format(where))
        labels = [part.label for part in self.partitions]
        if len(set(labels)) != len(labels):
            raise ManifestError("{}.partitions: a label is listed twice".format(where))
        for part in self.partitions:
            if part.stream is not None and part.stream not in streams:
                raise ManifestError("{}.partitions: {} names the stream {}, which is not in "
                                    "streams".format(where, part.label, part.stream))
            if part.stream is not None and streams[part.stream].raw_size > part.size:
                raise ManifestError("{}.partitions: the stream of {} ({} bytes) is larger than "
                                    "the partition ({} bytes)".format(
                                        where, part.label, streams[part.stream].raw_size,
                                        part.size))
        if self.boot.probe not in streams:
            raise ManifestError("{}.boot.probe: {} is not in streams".format(
                where, self.boot.probe))
        if [part.grows for part in self.partitions].count(True) != 1:
            raise ManifestError("{}.partitions: exactly one partition must grow".format(where))
        self.inner_image.check_extents(where + ".inner_image")
        if self.inner_image.compression not in self.flasher_decompressors:
            raise ManifestError("{}.inner_image: compressed with {}, which the flasher cannot "
                                "decompress".format(where, self.inner_image.compression))

    def partition(self, label):
        """The device partition with this label; ManifestError when absent."""
        for part in self.partitions:
            if part.label == label:
                return part
        raise ManifestError("manifest: no partition labelled {}".format(label))

    def stream(self, name):
        for stream in self.streams:
            if stream.file == name:
                return stream
        raise ManifestError("manifest: no stream named {}".format(name))


def dumps(manifest):
    # type: (Manifest) -> bytes
    """The manifest as JSON bytes, stable for the same content (sorted keys, fixed indent)."""
    manifest.validate("manifest")
    return (json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n").encode("utf-8")


def loads(data, where=MANIFEST_NAME):
    # type: (bytes, str) -> Manifest
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError("{}: not valid JSON ({}); the bundle is damaged: copy it "
                            "again".format(where, exc)) from exc
    return Manifest.from_dict(parsed, where)


def load(bundle_dir):
    # type: (str) -> Manifest
    """Read and validate manifest.json from a bundle directory."""
    path = os.path.join(bundle_dir, MANIFEST_NAME)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except (IOError, OSError) as exc:
        raise ManifestError("cannot read {}: {}; point --bundle at the directory holding the "
                            "bundle".format(path, exc.strerror or exc)) from exc
    return loads(data, path)
