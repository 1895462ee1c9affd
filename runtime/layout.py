"""The partition layout model: one disk's table as plain data.

Shared by the builder (which reads it from images with pyparted) and the runtime
(which reads it from manifest.json). Sizes and starts are in sectors of
`sector_size` bytes; partitions are found by label, never by number.
"""

import re

from .errors import MigrateError

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Optional  # noqa: F401  # novermin

PARTITION_KINDS = ("primary", "extended", "logical")
TABLE_TYPES = ("msdos", "gpt")
LABEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
FS_PATTERN = re.compile(r"^[a-z0-9]{1,16}$")
FLAG_PATTERN = re.compile(r"^[a-z_]{1,16}$")


class LayoutError(MigrateError, ValueError):
    """A layout whose data is inconsistent; the message names the field. Whoever reads a
    layout from outside turns it into its own refusal (the manifest's, the builder's)."""


class Partition(object):
    """One entry of a partition table."""

    __slots__ = ("number", "start", "size", "kind", "fs", "label", "flags", "type_id")

    def __init__(self, number, start, size, kind="primary", fs=None, label=None, flags=(),
                 type_id=None):
        # type: (int, int, int, str, Optional[str], Optional[str], tuple, Optional[int]) -> None  # noqa: E501
        self.number = number
        self.start = start
        self.size = size
        self.kind = kind
        self.fs = fs
        self.label = label
        self.flags = tuple(sorted(flags))
        # the msdos table's type byte (0x83 Linux, 0x82 swap, 0x0e FAT16 LBA, 0x05
        # extended), where the table was read byte by byte (runtime/mbr.py); None elsewhere
        self.type_id = type_id

    @property
    def end(self):
        # type: () -> int
        """The first sector after the partition."""
        return self.start + self.size

    def to_dict(self):
        # type: () -> dict
        data = {"number": self.number, "start": self.start, "size": self.size,
                "kind": self.kind, "fs": self.fs, "label": self.label,
                "flags": list(self.flags)}
        if self.type_id is not None:    # absent from manifests: their bytes stay the same
            data["type_id"] = self.type_id
        return data

    @classmethod
    def from_dict(cls, data, where="partition"):
        # type: (dict, str) -> Partition
        _require_keys(data, ("number", "start", "size", "kind"), where)
        part = cls(data["number"], data["start"], data["size"], data["kind"],
                   data.get("fs"), data.get("label"), tuple(data.get("flags", ())),
                   data.get("type_id"))
        part.validate(where)
        return part

    def validate(self, where="partition"):
        # type: (str) -> None
        for name in ("number", "start", "size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise LayoutError("{}.{}: expected a non-negative integer, found {!r}".format(
                    where, name, value))
        if self.kind not in PARTITION_KINDS:
            raise LayoutError("{}.kind: expected one of {}, found {!r}".format(
                where, ", ".join(PARTITION_KINDS), self.kind))
        if self.type_id is not None and (not isinstance(self.type_id, int) or isinstance(
                self.type_id, bool) or not 0 < self.type_id < 256):
            raise LayoutError("{}.type_id: expected 1..255, found {!r}".format(
                where, self.type_id))
        _check_optional(self.fs, FS_PATTERN, where + ".fs")
        _check_optional(self.label, LABEL_PATTERN, where + ".label")
        for flag in self.flags:
            _check_optional(flag, FLAG_PATTERN, where + ".flags")

    def __eq__(self, other):
        return isinstance(other, Partition) and self.to_dict() == other.to_dict()

    def __ne__(self, other):
        return not self == other

    def __repr__(self):
        return "Partition({})".format(", ".join(
            "{}={!r}".format(k, v) for k, v in sorted(self.to_dict().items())))


class Layout(object):
    """A partition table: its type, the disk's size and its partitions in table order."""

    __slots__ = ("table", "sector_size", "disk_size", "partitions")
    TYPES = TABLE_TYPES  # type: tuple  # what `table` may be (mbr.Table adds more)

    def __init__(self, table, sector_size, disk_size, partitions):
        # type: (str, int, int, list) -> None
        self.table = table
        self.sector_size = sector_size
        self.disk_size = disk_size
        self.partitions = list(partitions)

    def by_label(self, label):
        # type: (str) -> Partition
        """The partition carrying this filesystem label; KeyError when there is none."""
        for part in self.partitions:
            if part.label == label:
                return part
        raise KeyError(label)

    def has_label(self, label):
        # type: (str) -> bool
        return any(part.label == label for part in self.partitions)

    @property
    def end(self):
        # type: () -> int
        """The first sector after the last partition: the image's extent on a disk."""
        return max([part.end for part in self.partitions] or [0])

    def to_dict(self):
        # type: () -> dict
        return {"table": self.table, "sector_size": self.sector_size,
                "disk_size": self.disk_size,
                "partitions": [part.to_dict() for part in self.partitions]}

    @classmethod
    def from_dict(cls, data, where="layout"):
        # type: (dict, str) -> Layout
        _require_keys(data, ("table", "sector_size", "disk_size", "partitions"), where)
        if not isinstance(data["partitions"], list):
            raise LayoutError("{}.partitions: expected a list".format(where))
        layout = cls(data["table"], data["sector_size"], data["disk_size"], [
            Partition.from_dict(entry, "{}.partitions[{}]".format(where, index))
            for index, entry in enumerate(data["partitions"])])
        layout.validate(where)
        return layout

    def validate(self, where="layout"):
        # type: (str) -> None
        if self.table not in self.TYPES:
            raise LayoutError("{}.table: expected one of {}, found {!r}".format(
                where, ", ".join(self.TYPES), self.table))
        if self.sector_size not in (512, 1024, 2048, 4096):
            raise LayoutError("{}.sector_size: expected 512..4096, found {!r}".format(
                where, self.sector_size))
        for part in self.partitions:
            if part.end > self.disk_size:
                raise LayoutError(
                    "{}: partition {} ends at sector {}, past the end of the disk ({} sectors)"
                    .format(where, part.number, part.end, self.disk_size))
        labels = [part.label for part in self.partitions if part.label]
        if len(labels) != len(set(labels)):
            raise LayoutError("{}: a filesystem label appears twice: {}".format(
                where, ", ".join(sorted(labels))))

    def __eq__(self, other):
        return isinstance(other, Layout) and self.to_dict() == other.to_dict()

    def __ne__(self, other):
        return not self == other


def _require_keys(data, keys, where):
    if not isinstance(data, dict):
        raise LayoutError("{}: expected an object, found {}".format(where, type(data).__name__))
    missing = [key for key in keys if key not in data]
    if missing:
        raise LayoutError("{}: missing {}".format(where, ", ".join(missing)))


def _check_optional(value, pattern, where):
    if value is None:
        return
    if not isinstance(value, str) or not pattern.match(value):
        raise LayoutError("{}: {!r} does not match {}".format(where, value, pattern.pattern))
