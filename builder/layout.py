"""Partition layouts of images: read with pyparted, parsed from `parted unit s print`,
or loaded from the reference files in layouts/.

msdos tables carry no partition names, so each partition's label comes from its
filesystem (blkid probing the image at the partition's offset).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import parted

from runtime.layout import Layout, LayoutError, Partition
from runtime.run import run

from .errors import FlasherLayoutError, InputFormatError

LAYOUTS_DIR = Path(__file__).resolve().parent.parent / "layouts"

_PARTED_ERRORS = (parted.DiskException, parted.DiskLabelException, parted.IOException,
                  parted.DeviceException, parted.PartitionException,
                  parted.UnknownDeviceException, parted.UnknownTypeException)
_KIND_BY_PARTED_TYPE = {
    parted.PARTITION_NORMAL: "primary",
    parted.PARTITION_LOGICAL: "logical",
    parted.PARTITION_EXTENDED: "extended",
}
# parted's filesystem names, as blkid (and this project) call them.
_FS_BY_PARTED_NAME = {"fat16": "vfat", "fat32": "vfat", "fat12": "vfat", "ext4": "ext4",
                      "ext3": "ext3", "ext2": "ext2"}


@dataclass(frozen=True)
class Probe:
    """What blkid finds at one partition's offset."""

    fs: str | None = None
    label: str | None = None
    version: str | None = None
    uuid: str | None = None


def probe(image: Path, offset: int, size: int) -> Probe:
    """The filesystem blkid sees in image[offset:offset+size], without the kernel."""
    result = run(["blkid", "-p", "-o", "export", "-O", offset, "-S", size, image],
                 ok_codes=(0, 2))
    if result.returncode == 2:
        return Probe()
    values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    return Probe(fs=values.get("TYPE"), label=values.get("LABEL"),
                 version=values.get("VERSION"), uuid=values.get("UUID"))


#: The partition type of a GPT disk's protective MBR entry.
GPT_PROTECTIVE_TYPE = 0xEE


def has_protective_mbr(image: Path) -> bool:
    """Whether sector 0 is a GPT disk's protective MBR: a GPT disk, whatever state its
    GPT headers are in (libparted gives up on a damaged primary header that sfdisk and
    the firmware would recover from the backup)."""
    with image.open("rb") as handle:
        mbr = handle.read(512)
    if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
        return False
    return any(mbr[446 + 16 * slot + 4] == GPT_PROTECTIVE_TYPE for slot in range(4))


def read_layout(image: Path) -> Layout:
    """The image's partition table, with each partition's filesystem type and label."""
    try:
        device = parted.getDevice(str(image))
        disk = parted.newDisk(device)
    except _PARTED_ERRORS as exc:
        raise InputFormatError(
            f"{image}: cannot read a partition table ({exc}); the image is truncated or "
            "not a disk image") from exc
    sector = device.sectorSize
    partitions = []
    for part in disk.partitions:
        kind = _KIND_BY_PARTED_TYPE.get(part.type)
        if kind is None:
            continue
        fs = label = None
        if kind != "extended":
            found = probe(image, part.geometry.start * sector, part.geometry.length * sector)
            fs, label = found.fs, found.label
            if fs is None and part.fileSystem is not None:
                fs = _FS_BY_PARTED_NAME.get(part.fileSystem.type)
        flags = [flag.strip() for flag in part.getFlagsAsString().split(",") if flag.strip()]
        partitions.append(Partition(part.number, part.geometry.start, part.geometry.length,
                                    kind, fs, label, tuple(flags)))
    layout = Layout(disk.type, sector, device.length, partitions)
    try:
        layout.validate(str(image))
    except LayoutError as exc:
        raise FlasherLayoutError(
            f"{exc}: no flasher balena publishes has such a table. Download the flasher "
            "again, or repack an unmodified one") from exc
    return layout


_SECTORS = re.compile(r"^(\d+)s$")


def parse_parted_print(text: str) -> Layout:
    """A Layout from the text of `parted IMAGE unit s print` (labels left empty).

    Reads the optional header (disk size, sector size, table type) and the table by
    the columns of its heading line, since the filesystem and flag columns may be blank.
    """
    disk_size = None
    sector_size = 512
    table = "msdos"
    lines = text.splitlines()
    for line in lines:
        if match := re.match(r"^Disk .*: (\d+)s\s*$", line):
            disk_size = int(match.group(1))
        elif match := re.match(r"^Sector size \(logical/physical\): (\d+)B", line):
            sector_size = int(match.group(1))
        elif match := re.match(r"^Partition Table: (\S+)", line):
            table = match.group(1)
    heading_index = next((i for i, line in enumerate(lines) if line.startswith("Number")), None)
    if heading_index is None:
        raise ValueError("no partition table heading ('Number  Start  End ...') in the text")
    heading = lines[heading_index]
    names = ["Number", "Start", "End", "Size", "Type", "File system", "Flags"]
    starts = [heading.find(name) for name in names]
    if any(position < 0 for position in starts[:4]):
        raise ValueError(f"unexpected parted heading: {heading!r}")
    partitions = []
    for line in lines[heading_index + 1:]:
        if not line.strip():
            continue
        cells = {}
        for index, name in enumerate(names):
            if starts[index] < 0:
                continue
            later = [pos for pos in starts[index + 1:] if pos >= 0]
            end = later[0] if later else None
            cells[name] = line[starts[index]:end].strip()
        start = _sectors(cells["Start"])
        size = _sectors(cells["Size"])
        fs_name = re.sub(r"\(.*\)$", "", cells.get("File system", ""))
        flags = [flag.strip() for flag in cells.get("Flags", "").split(",") if flag.strip()]
        partitions.append(Partition(int(cells["Number"]), start, size,
                                    cells.get("Type") or "primary",
                                    _FS_BY_PARTED_NAME.get(fs_name, fs_name or None),
                                    None, tuple(flags)))
    if disk_size is None:
        disk_size = max(part.end for part in partitions)
    layout = Layout(table, sector_size, disk_size, partitions)
    layout.validate("parted output")
    return layout


def _sectors(cell: str) -> int:
    match = _SECTORS.match(cell)
    if not match:
        raise ValueError(f"expected a sector count like '8192s', found {cell!r} "
                         "(run parted with 'unit s')")
    return int(match.group(1))


@dataclass(frozen=True)
class ReferenceLayout:
    """A layout file from layouts/: a documented table and what each partition is for."""

    name: str
    description: str
    layout: Layout
    roles: dict = field(default_factory=dict)

    @classmethod
    def load(cls, name: str) -> ReferenceLayout:
        path = LAYOUTS_DIR / f"{name}.json"
        data = json.loads(path.read_text())
        return cls(name=data["name"], description=data["description"],
                   layout=Layout.from_dict(data["layout"], str(path)),
                   roles=data.get("roles", {}))

    def formatted_labels(self) -> list[str]:
        """Labels of the partitions that carry a filesystem in an image of this kind."""
        return [part.label for part in self.layout.partitions if part.label and part.fs]


def check_labels(found: Layout, reference: ReferenceLayout, image: str, what: str) -> None:
    """Refuse an image that lacks any of the reference's filesystems (by label and type)."""
    problems = []
    for expected in reference.layout.partitions:
        if not expected.label or not expected.fs:
            continue
        if not found.has_label(expected.label):
            problems.append(f"no partition labelled {expected.label} ({expected.fs})")
        elif found.by_label(expected.label).fs != expected.fs:
            problems.append(f"{expected.label} holds {found.by_label(expected.label).fs}, "
                            f"expected {expected.fs}")
    if found.table != reference.layout.table:
        problems.insert(0, f"the partition table is {found.table}, expected "
                           f"{reference.layout.table}")
    if problems:
        seen = ", ".join(f"{part.number}:{part.label or '-'}({part.fs or 'no filesystem'})"
                         for part in found.partitions)
        raise FlasherLayoutError(
            f"{image}: not {what}: {'; '.join(problems)}. Partitions found: {seen}. "
            f"Use a {reference.description}.")

