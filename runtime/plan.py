"""Where the flasher's partitions go: the swap area, rebuilt as flash-boot, flash-rootA and
flash-data, as primary or logical partitions depending on where the swap was, after one
unpartitioned MiB that holds the flasher's own GRUB core.img (runtime/bootcore.py).

Pure computation on the tables of runtime/mbr.py and the manifest: nothing here touches
a disk.
"""

from .errors import MigrateError
from .mbr import FAT16_LBA_TYPE, LINUX_TYPE, SECTOR, Table, partition
from .system import partition_path

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Dict, List, Optional  # noqa: F401  # novermin

    from .layout import Partition  # noqa: F401
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


class Placement(object):
    """Where the flash partitions go: the table stage 1 found, the table it writes (the
    same disk identifier and partitions, the swap replaced by the flash partitions, which
    carry their labels), and the sectors stage 2 must not write over. The state file keeps
    it (to_dict), so that each later step, rollback and status read the same tables."""

    def __init__(self, original, new, swap_number, core_start, protected_start):
        # type: (Table, Table, int, int, int) -> None
        self.original = original
        self.new = new
        self.swap_number = swap_number
        # CORE_SECTORS sectors from here, in no partition: the flasher's core.img
        self.core_start = core_start
        # The first sector the resinOS image must not reach: the flash partitions, the
        # extended boot records that describe them, and the flasher's core.img.
        self.protected_start = protected_start

    @property
    def swap(self):
        # type: () -> Partition
        part = self.original.number(self.swap_number)
        if part is None:
            raise PlanError("the recorded table has no partition {}".format(self.swap_number))
        return part

    @property
    def flash(self):
        # type: () -> List[Partition]
        """The flash partitions, in the order of the disk."""
        return sorted((part for part in self.new.partitions if part.label),
                      key=lambda part: part.start)

    @property
    def new_extended(self):
        # type: () -> Optional[Partition]
        """The extended partition stage 1 creates in the swap's slot, if it does."""
        return self.new.extended if self.original.extended is None else None

    def partition(self, label):
        # type: (str) -> Partition
        for part in self.flash:
            if part.label == label:
                return part
        raise PlanError("no flash partition {} in the recorded layout".format(label))

    def to_dict(self):
        # type: () -> dict
        return {"original": self.original.to_dict(), "new": self.new.to_dict(),
                "swap_number": self.swap_number, "core_start": self.core_start,
                "protected_start": self.protected_start}

    @classmethod
    def from_dict(cls, data):
        # type: (dict) -> Placement
        try:
            return cls(Table.from_dict(data["original"], "original table"),
                       Table.from_dict(data["new"], "new table"), int(data["swap_number"]),
                       int(data["core_start"]), int(data["protected_start"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError("the recorded partition layout is unreadable ({}); run "
                            "'rollback' with the resin-migrate that started stage 1".format(
                                exc)) from exc


def describe(part, manifest):
    # type: (Partition, Manifest) -> dict
    """A flash partition for `plan --json` and the log: where it goes and what fills it."""
    wanted = next(entry for entry in manifest.partitions if entry.label == part.label)
    return {"label": part.label, "number": part.number, "start": part.start,
            "size": part.size, "fs": part.fs, "stream": wanted.stream, "grows": wanted.grows}


def place(disk, table, swap, manifest, reserve_bytes=0):
    # type: (str, Table, Partition, Manifest, int) -> Placement
    """Place the manifest's partitions in the swap partition's extent of disk's table.

    reserve_bytes: room flash-data must have beyond its minimum (the backup).
    """
    def node(part):
        # type: (Partition) -> str
        return partition_path(disk, part.number)

    wanted = manifest.partitions
    area_start, area_end = swap.start, swap.end
    new_extended = None
    first_ebr = 0       # where the first logical flash partition's EBR goes, if logical
    if swap.kind == "logical":
        later = [part for part in table.logicals if part.number > swap.number]
        if later:
            raise PlanError(
                "the swap partition {} is followed by the logical partition(s) {}; replacing "
                "it would renumber them and break what refers to them by name. Move or remove "
                "them first, or free another swap area.".format(
                    node(swap), ", ".join(node(part) for part in later)))
        numbers = [swap.number + index for index in range(len(wanted))]
        first = area_start
        logical = True
        extended = table.extended
        if extended is None:
            raise PlanError("{} is a logical partition, but the table of {} has no extended "
                            "partition".format(node(swap), disk))
        first_ebr = table.ebrs[swap.number]     # the swap's own record, rewritten
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
            new_extended = partition(swap.number, area_start, area_end - area_start,
                                     "extended", 0x05)
            numbers = [5 + index for index in range(len(wanted))]
            first = align_up(area_start + 1)
            logical = True
            first_ebr = area_start
            protected = area_start
        else:
            raise PlanError(
                "the swap partition {} is a primary partition, the disk has no free primary "
                "slot for {} partitions and already has an extended partition ({}); an msdos "
                "disk holds only one. Free a primary slot first.".format(
                    node(swap), len(wanted), node(table.extended)))

    core_start = first
    flash = []
    ebrs = dict((number, sector) for number, sector in table.ebrs.items()
                if number != swap.number)   # type: Dict[int, int]
    # the first flash partition on a MiB boundary, also where the swap was not on one
    # (DOS-compatible layouts start a logical partition 63 sectors after its EBR)
    start = align_up(first + CORE_SECTORS)
    for index, part in enumerate(wanted):
        if index and logical:
            start = align_up(start + 1)      # room for the extended boot record
        size = sectors_for(part.size)
        flash.append(partition(numbers[index], start, size,
                               "logical" if logical else "primary", TYPES[part.fs],
                               fs=part.fs, label=part.label))
        if logical:
            # the first one's EBR is the swap's (or the new extended partition's first
            # sector); the others' lie in the sector before them
            ebrs[numbers[index]] = first_ebr if index == 0 else start - 1
        start += size
    growing = [flash[index] for index, part in enumerate(wanted) if part.grows]
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
                node(swap), (swap.size * SECTOR) // MIB, (needed * SECTOR) // MIB,
                reserve_bytes // MIB))
    kept = [part for part in table.partitions if part.number != swap.number]
    new = Table("msdos", table.disk_size, kept + ([new_extended] if new_extended else []) +
                flash, table.disk_id, ebrs)
    return Placement(table, new, swap.number, core_start, protected)
