"""Where the flasher's partitions go: the swap area, rebuilt as flash-boot, flash-rootA and
flash-data, as primary or logical partitions depending on where the swap was, after one
unpartitioned MiB that holds the flasher's own GRUB core.img (runtime/bootcore.py).

Pure computation on a Table and the manifest: nothing here touches a disk.
"""

from .disk import FAT16_LBA_TYPE, LINUX_TYPE, SECTOR, Table, TablePartition
from .errors import MigrateError
from .system import partition_path

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import List, Optional  # noqa: F401  # novermin

    from .manifest import Manifest  # noqa: F401

ALIGN = 2048            # 1 MiB in sectors, as installers align
CORE_SECTORS = ALIGN    # the flasher's core.img, before the first flash partition
MIB = 1 << 20
TYPES = {"vfat": FAT16_LBA_TYPE, "ext4": LINUX_TYPE}


class PlanError(MigrateError):
    """The flasher's partitions cannot be placed on this disk."""

    exit_code = 10


def align_up(sector):
    # type: (int) -> int
    return -(-sector // ALIGN) * ALIGN


def sectors_for(size_bytes):
    # type: (int) -> int
    """Sectors for size_bytes, rounded up to whole MiB."""
    return align_up(-(-size_bytes // SECTOR))


class FlashPartition(object):
    """A partition stage 1 creates: where it goes and what fills it."""

    def __init__(self, label, number, start, size, fs, stream, grows):
        # type: (str, int, int, int, str, Optional[str], bool) -> None
        self.label = label
        self.number = number
        self.start = start
        self.size = size          # sectors
        self.fs = fs
        self.stream = stream      # bundle file written onto it, or None (formatted empty)
        self.grows = grows

    @property
    def end(self):
        # type: () -> int
        return self.start + self.size

    def to_dict(self):
        return {"label": self.label, "number": self.number, "start": self.start,
                "size": self.size, "fs": self.fs, "stream": self.stream, "grows": self.grows}


class Layout(object):
    """The flash partitions' placement in the swap area, and the table that results."""

    def __init__(self, table, swap, flash, new_extended, protected_start, core_start):
        # type: (Table, TablePartition, List[FlashPartition], Optional[TablePartition], int, int) -> None  # noqa: E501
        self.table = table
        self.swap = swap
        self.flash = flash
        self.new_extended = new_extended
        # The first sector the resinOS image must not reach: the flash partitions, the
        # extended boot records that describe them, and the flasher's core.img.
        self.protected_start = protected_start
        # CORE_SECTORS sectors from here, in no partition: the flasher's core.img
        self.core_start = core_start

    def new_table(self):
        # type: () -> Table
        parts = [part for part in self.table.partitions if part.number != self.swap.number]
        if self.new_extended is not None:
            parts.append(self.new_extended)
        for flash in self.flash:
            parts.append(TablePartition(partition_path(self.table.disk, flash.number),
                                        flash.number, flash.start, flash.size,
                                        TYPES[flash.fs], False))
        parts.sort(key=lambda part: part.number)
        return Table(self.table.disk, self.table.label, self.table.sectors, parts)

    def script(self, original_dump):
        # type: (str) -> str
        """An sfdisk script for the new table: the original dump's header and untouched
        lines, the swap's line replaced by the flash partitions' lines."""
        # sfdisk -d prints its header (label, label-id, device, unit, ...), a blank line,
        # then one line a partition: keep the header, so the disk keeps its identifier.
        header = original_dump.split("\n\n", 1)[0].strip().splitlines()
        lines = []
        for part in self.new_table().partitions:
            fields = ["start={}".format(part.start), "size={}".format(part.size),
                      "type={}".format(part.type)]
            if part.bootable:
                fields.append("bootable")
            lines.append("{} : {}".format(part.node, ", ".join(fields)))
        return "\n".join(header) + "\n\n" + "\n".join(lines) + "\n"


def place(table, swap, manifest, reserve_bytes=0):
    # type: (Table, TablePartition, Manifest, int) -> Layout
    """Place the manifest's partitions in the swap partition's extent.

    reserve_bytes: room flash-data must have beyond its minimum (the backup).
    """
    wanted = manifest.partitions
    area_start, area_end = swap.start, swap.end
    new_extended = None
    if swap.is_logical:
        later = [part for part in table.partitions if part.is_logical and part.number > swap.number]
        if later:
            raise PlanError(
                "the swap partition {} is followed by the logical partition(s) {}; replacing "
                "it would renumber them and break what refers to them by name. Move or remove "
                "them first, or free another swap area.".format(
                    swap.node, ", ".join(part.node for part in later)))
        numbers = [swap.number + index for index in range(len(wanted))]
        first = area_start
        logical = True
        extended = table.extended
        if extended is None:
            raise PlanError("{} is a logical partition, but the table of {} has no extended "
                            "partition".format(swap.node, table.disk))
        # Logical partitions are reached through the chain of boot records that starts at
        # the extended partition's first sector: all of it must survive stage 2's write.
        protected = extended.start
    else:
        used = set(part.number for part in table.primaries if part.number != swap.number)
        free = [number for number in range(1, 5) if number not in used]
        if len(free) >= len(wanted):
            numbers = [swap.number] + [n for n in free if n != swap.number][:len(wanted) - 1]
            first = area_start
            logical = False
            protected = area_start
        elif table.extended is None:
            new_extended = TablePartition(partition_path(table.disk, swap.number), swap.number,
                                          area_start, area_end - area_start, "5", False)
            numbers = [5 + index for index in range(len(wanted))]
            first = align_up(area_start + 1)
            logical = True
            protected = area_start
        else:
            raise PlanError(
                "the swap partition {} is a primary partition, the disk has no free primary "
                "slot for {} partitions and already has an extended partition ({}); an msdos "
                "disk holds only one. Free a primary slot first.".format(
                    swap.node, len(wanted), table.extended.node))

    core_start = first
    flash = []
    start = first + CORE_SECTORS
    for index, part in enumerate(wanted):
        if index and logical:
            start = align_up(start + 1)      # room for the extended boot record
        size = sectors_for(part.size)
        flash.append(FlashPartition(part.label, numbers[index], start, size, part.fs,
                                    part.stream, part.grows))
        start += size
    growing = [item for item in flash if item.grows]
    if len(growing) == 1 and growing[0] is flash[-1]:
        growing[0].size = area_end - growing[0].start
    needed_data = sectors_for(next(p.size for p in wanted if p.grows) + reserve_bytes)
    data = growing[0] if growing else None
    if flash[-1].end > area_end or (data is not None and data.size < needed_data):
        needed = sum(sectors_for(p.size) for p in wanted) + sectors_for(reserve_bytes) + \
            (len(wanted) + 1) * ALIGN + CORE_SECTORS
        raise PlanError(
            "the swap partition {} holds {} MiB; the flasher's partitions need {} MiB "
            "(flash-boot, flash-rootA, flash-data with {} MiB for the backup). Use a device "
            "with a larger swap partition, or a smaller backup.".format(
                swap.node, (swap.size * SECTOR) // MIB, (needed * SECTOR) // MIB,
                reserve_bytes // MIB))
    return Layout(table, swap, flash, new_extended, protected, core_start)
