"""The msdos partition table, in bytes: the master boot record in sector 0 and the chain of
extended boot records (EBRs) that describes the logical partitions, decoded into and
encoded from a Table of layout.Partition entries with the standard library's struct.

This program reads and writes the table itself rather than through sfdisk: Ubuntu 14.04
has util-linux 2.20.1, whose sfdisk knows neither --json nor the dump format of the
rewritten one (2.26), and 16.04's lacks --no-tell-kernel (2.29). Nothing here touches a
device (runtime/disk.py does); every rule below is the one the Linux kernel's own reader
applies (block/partitions/msdos.c), so the partitions the model sees are the ones the
kernel and udev will show.

On-disk format (the IBM PC's, which fdisk, sfdisk, parted and the kernel share):
- sector 0: boot code (0-439), disk identifier (440-443, little-endian), 2 bytes, four
  16-byte entries at 446, signature 55 AA at 510;
- an entry: status (0x80 bootable, else 0), CHS of the first sector, type, CHS of the
  last sector, first sector (LBA, 32 bits), number of sectors (32 bits);
- an EBR: the same four entries and signature; its first entry is the logical partition,
  relative to the EBR's own sector; its second links to the next EBR, relative to the
  extended partition's first sector. Logical partitions are numbered from 5 in chain order.
"""

import binascii
import struct

from .errors import MigrateError
from .layout import Layout, LayoutError, Partition

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Callable, Dict, List, Optional  # noqa: F401  # novermin

SECTOR = 512
DISK_ID_OFFSET = 440
ENTRIES_OFFSET = 446
SIGNATURE_OFFSET = 510
SIGNATURE = b"\x55\xaa"
ENTRY = struct.Struct("<B3sB3sII")
BOOTABLE = 0x80
EXTENDED_TYPES = (0x05, 0x0F, 0x85)   # CHS, LBA and Linux extended: the kernel follows all
GPT_PROTECTIVE = 0xEE
LINUX_TYPE = 0x83
FAT16_LBA_TYPE = 0x0E
FIRST_LOGICAL = 5
# The kernel stops following a chain after this many logical partitions (DISK_MAX_PARTS
# and its loop guard); a longer chain is a loop or damage.
MAX_LOGICAL = 256
# CHS as the BIOS of a disk larger than 8 GiB sees it: 255 heads, 63 sectors a track; an
# address past cylinder 1023 is written as the largest one, as fdisk and parted do.
HEADS, TRACK_SECTORS = 255, 63
CHS_MAX = b"\xfe\xff\xff"


class TableError(MigrateError):
    """A partition table this program will not read or write; the message says where."""

    exit_code = 11


class Table(Layout):
    """An msdos disk's partitions (layout.Partition: number, kind, start, size, type_id,
    'boot' flag), what sector 0 carries besides them, and where each logical partition's
    EBR lies. `table` is 'msdos', or 'gpt' / 'none' for a disk this program refuses."""

    __slots__ = ("disk_id", "ebrs")
    TYPES = ("msdos", "gpt", "none")  # type: tuple

    def __init__(self, table, disk_size, partitions, disk_id=0, ebrs=None):
        # type: (str, int, list, int, Optional[Dict[int, int]]) -> None
        Layout.__init__(self, table, SECTOR, disk_size, sorted(
            partitions, key=lambda part: part.number))
        self.disk_id = disk_id
        self.ebrs = dict(ebrs or {})    # {logical partition number: sector of its EBR}

    def number(self, number):
        # type: (int) -> Optional[Partition]
        for part in self.partitions:
            if part.number == number:
                return part
        return None

    @property
    def extended(self):
        # type: () -> Optional[Partition]
        for part in self.partitions:
            if part.kind == "extended":
                return part
        return None

    @property
    def primaries(self):
        # type: () -> List[Partition]
        return [part for part in self.partitions if part.kind != "logical"]

    @property
    def logicals(self):
        # type: () -> List[Partition]
        return [part for part in self.partitions if part.kind == "logical"]

    @property
    def disk_id_text(self):
        # type: () -> str
        """The identifier as fdisk and blkid (PTUUID) print it: 8 hex digits."""
        return "{:08x}".format(self.disk_id)

    def partuuid(self, number):
        # type: (int) -> str
        """What fstab's PARTUUID= names on an msdos disk: the disk identifier and the
        partition number (util-linux libblkid's rule; blkid -p reports it only from 2.24,
        so Ubuntu 14.04's does not)."""
        return "{}-{:02x}".format(self.disk_id_text, number)

    def entries(self):
        # type: () -> list
        """What the kernel and udev see, one tuple a partition: (number, kind, start, size,
        type, bootable). Two tables with the same entries describe the same partitions."""
        return [(part.number, part.kind, part.start, part.size, part.type_id,
                 "boot" in part.flags) for part in self.partitions]

    def to_dict(self):
        # type: () -> dict
        data = Layout.to_dict(self)
        data["disk_id"] = self.disk_id_text
        data["ebrs"] = dict((str(number), sector) for number, sector in sorted(self.ebrs.items()))
        return data

    @classmethod
    def from_dict(cls, data, where="table"):
        # type: (dict, str) -> Table
        layout = Layout.from_dict(data, where)
        try:
            disk_id = int(data.get("disk_id", "0"), 16)
            ebrs = dict((int(number), int(sector))
                        for number, sector in data.get("ebrs", {}).items())
        except (TypeError, ValueError, AttributeError) as exc:
            raise LayoutError("{}: disk_id or ebrs unreadable: {}".format(where, exc)) from exc
        table = cls(layout.table, layout.disk_size, layout.partitions, disk_id, ebrs)
        table.validate(where)
        return table

    def validate(self, where="table"):
        # type: (str) -> None
        Layout.validate(self, where)
        for part in self.partitions:
            if part.type_id is None:
                raise LayoutError("{}: partition {} has no type".format(where, part.number))
        extended = [part for part in self.partitions if part.kind == "extended"]
        if len(extended) > 1:
            raise LayoutError("{}: {} extended partitions; an msdos table holds one".format(
                where, len(extended)))
        for part in self.logicals:
            if part.number not in self.ebrs:
                raise LayoutError("{}: logical partition {} has no EBR".format(
                    where, part.number))


def partition(number, start, size, kind, type_id, bootable=False, fs=None, label=None):
    # type: (int, int, int, str, int, bool, Optional[str], Optional[str]) -> Partition
    return Partition(number, start, size, kind, fs, label, ("boot",) if bootable else (),
                     type_id=type_id)


def decode(read_sector, disk_size):
    # type: (Callable[[int], bytes], int) -> Table
    """The table of a disk of disk_size sectors, read_sector(n) giving sector n's bytes."""
    mbr = read_sector(0)
    if len(mbr) < SECTOR or mbr[SIGNATURE_OFFSET:SECTOR] != SIGNATURE:
        return Table("none", disk_size, [])
    slots = _entries(mbr)
    if any(slot[2] == GPT_PROTECTIVE for slot in slots):
        return Table("gpt", disk_size, [])
    disk_id = struct.unpack_from("<I", mbr, DISK_ID_OFFSET)[0]
    parts = []
    for index, (status, _chs, type_id, _chs_end, start, size) in enumerate(slots):
        number = index + 1
        if _empty(status, type_id, start, size, "entry {} of sector 0".format(number)):
            continue
        kind = "extended" if type_id in EXTENDED_TYPES else "primary"
        parts.append(partition(number, start, size, kind, type_id, status == BOOTABLE))
    extended = [part for part in parts if part.kind == "extended"]
    if len(extended) > 1:
        raise TableError("sector 0 has {} extended partitions ({}); an msdos table holds "
                         "one, and the kernel would follow only the first".format(
                             len(extended), ", ".join(str(p.number) for p in extended)))
    ebrs = {}   # type: Dict[int, int]
    if extended:
        logicals, ebrs = _chain(read_sector, extended[0])
        parts += logicals
    table = Table("msdos", disk_size, parts, disk_id, ebrs)
    try:
        table.validate("the partition table")
    except LayoutError as exc:
        raise TableError(str(exc)) from exc
    _check_overlaps(table)
    return table


def _chain(read_sector, extended):
    # type: (Callable[[int], bytes], Partition) -> tuple
    """The logical partitions and their EBRs' sectors, following the links from the
    extended partition's first sector."""
    parts = []      # type: List[Partition]
    ebrs = {}       # type: Dict[int, int]
    seen = set()    # type: set
    ebr, number = extended.start, FIRST_LOGICAL
    while True:
        if ebr in seen or len(seen) > MAX_LOGICAL:
            raise TableError("the chain of extended boot records loops back to sector {}"
                             .format(ebr))
        seen.add(ebr)
        if not extended.start <= ebr < extended.end:
            raise TableError("an extended boot record links to sector {}, outside the "
                             "extended partition (sectors {}-{})".format(
                                 ebr, extended.start, extended.end - 1))
        record = read_sector(ebr)
        if record[SIGNATURE_OFFSET:SECTOR] != SIGNATURE:
            if ebr == extended.start:
                return parts, ebrs     # an extended partition with no logical one yet
            raise TableError("the extended boot record at sector {} has no 55 AA signature: "
                             "the chain of logical partitions is broken there (the kernel "
                             "stops reading, fdisk goes on)".format(ebr))
        data = []       # type: List[tuple]
        links = []      # type: List[tuple]
        for index, (status, _chs, type_id, _end, start, size) in enumerate(_entries(record)):
            if _empty(status, type_id, start, size, "entry {} of the EBR at sector {}".format(
                    index + 1, ebr)):
                continue
            (links if type_id in EXTENDED_TYPES else data).append((status, type_id, start, size))
        if len(data) > 1 or len(links) > 1:
            raise TableError("the extended boot record at sector {} describes {} partitions "
                             "and {} links; fdisk, parted and the kernel write one of each"
                             .format(ebr, len(data), len(links)))
        if data:
            status, type_id, start, size = data[0]
            part = partition(number, ebr + start, size, "logical", type_id, status == BOOTABLE)
            if part.start <= ebr or part.end > extended.end:
                raise TableError("logical partition {} (sectors {}-{}) lies outside the space "
                                 "its EBR at sector {} and the extended partition (to {}) "
                                 "give it".format(number, part.start, part.end - 1, ebr,
                                                  extended.end - 1))
            parts.append(part)
            ebrs[number] = ebr
            number += 1
        if not links:
            return parts, ebrs
        ebr = extended.start + links[0][2]


def _entries(sector):
    # type: (bytes) -> list
    return [ENTRY.unpack_from(sector, ENTRIES_OFFSET + 16 * index) for index in range(4)]


def _empty(status, type_id, start, size, where):
    # type: (int, int, int, int, str) -> bool
    """True for an unused entry. The kernel keeps an entry whose type is 0 if it has a
    size, fdisk drops it: refuse what the two would read differently."""
    if status not in (0, BOOTABLE):
        raise TableError("{} has the status byte 0x{:02x} (0x00 or 0x80 expected): not an "
                         "msdos partition table this program can read".format(where, status))
    if size == 0:
        return True
    if type_id == 0:
        raise TableError("{} has type 0 (empty) but {} sectors from sector {}; fdisk and the "
                         "kernel read it differently. Delete or retype it first".format(
                             where, size, start))
    return False


def _check_overlaps(table):
    # type: (Table) -> None
    extended = table.extended
    for kind_group in (table.primaries, table.logicals):
        spans = sorted((part.start, part.end, part.number) for part in kind_group)
        for (_s1, end1, n1), (start2, _e2, n2) in zip(spans, spans[1:]):
            if start2 < end1:
                raise TableError("partitions {} and {} overlap".format(n1, n2))
    if extended is None and table.logicals:
        raise TableError("logical partitions without an extended partition")


def encode(table, current):
    # type: (Table, Callable[[int], bytes]) -> Dict[int, bytes]
    """The sectors that hold table: {sector: 512 bytes}, sector 0 and every EBR.

    current(n) gives what sector n holds now: everything but the entries and the signature
    is kept (boot code, disk identifier), and an entry that says what it said before keeps
    its bytes (the CHS fields fdisk or an installer wrote), so that writing a table read
    from a disk gives back the same bytes.
    """
    table.validate("the new partition table")
    sectors = {}
    mbr = bytearray(current(0))
    if len(mbr) < SECTOR:
        mbr = bytearray(SECTOR)
    struct.pack_into("<I", mbr, DISK_ID_OFFSET, table.disk_id)
    by_slot = dict((part.number, part) for part in table.primaries)
    for slot in range(1, 5):
        part = by_slot.get(slot)
        _put(mbr, slot - 1, _entry(part.start, part.size, _type(part), "boot" in part.flags)
             if part is not None else bytes(16))
    mbr[SIGNATURE_OFFSET:SECTOR] = SIGNATURE
    sectors[0] = bytes(mbr)
    extended = table.extended
    logicals = table.logicals
    if extended is None:
        return sectors
    if not logicals:
        sectors[extended.start] = _ebr(current(extended.start), None, None)
        return sectors
    for index, part in enumerate(logicals):
        ebr = table.ebrs[part.number]
        following = logicals[index + 1] if index + 1 < len(logicals) else None
        data = _entry(part.start - ebr, part.size, _type(part), "boot" in part.flags, ebr)
        link = None
        if following is not None:
            next_ebr = table.ebrs[following.number]
            link = _entry(next_ebr - extended.start, following.end - next_ebr, 0x05, False,
                          extended.start)
        sectors[ebr] = _ebr(current(ebr), data, link)
    if logicals and table.ebrs[logicals[0].number] != extended.start:
        # the kernel starts at the extended partition's first sector: an EBR there must
        # lead to the first logical one (fdisk leaves an empty EBR that links when the
        # first logical partition is deleted)
        first = table.ebrs[logicals[0].number]
        sectors[extended.start] = _ebr(current(extended.start), None, _entry(
            first - extended.start, logicals[0].end - first, 0x05, False, extended.start))
    return sectors


def _type(part):
    # type: (Partition) -> int
    if part.type_id is None:    # validate() refuses such a table first
        raise TableError("partition {} has no type".format(part.number))
    return part.type_id


def _ebr(current, data, link):
    # type: (bytes, Optional[bytes], Optional[bytes]) -> bytes
    record = bytearray(current) if len(current) == SECTOR else bytearray(SECTOR)
    if record[SIGNATURE_OFFSET:SECTOR] != SIGNATURE:
        record = bytearray(SECTOR)    # not an EBR yet: nothing of it is worth keeping
    _put(record, 0, data or bytes(16))
    _put(record, 1, link or bytes(16))
    _put(record, 2, bytes(16))
    _put(record, 3, bytes(16))
    record[SIGNATURE_OFFSET:SECTOR] = SIGNATURE
    return bytes(record)


def _put(sector, index, entry):
    # type: (bytearray, int, bytes) -> None
    offset = ENTRIES_OFFSET + 16 * index
    old = bytes(sector[offset:offset + 16])
    if old != entry and _same_meaning(old, entry):
        return          # keep the CHS values whoever wrote the entry chose
    sector[offset:offset + 16] = entry


def _same_meaning(old, new):
    # type: (bytes, bytes) -> bool
    a, b = ENTRY.unpack(old), ENTRY.unpack(new)
    return (a[0], a[2], a[4], a[5]) == (b[0], b[2], b[4], b[5])


def _entry(start, size, type_id, bootable, base=0):
    # type: (int, int, int, bool, int) -> bytes
    """One 16-byte entry; start is relative to base, the sector the entry's record counts
    from. The CHS fields are those of the absolute sectors, with 255 heads and 63 sectors a
    track (the geometry sfdisk --verify and fdisk check them against)."""
    if not (0 <= start < 1 << 32 and 0 < size < 1 << 32):
        raise TableError("a partition of {} sectors from sector {} does not fit an msdos "
                         "table (32-bit sector numbers: disks up to 2 TiB)".format(size, start))
    return ENTRY.pack(BOOTABLE if bootable else 0, _chs(base + start), type_id,
                      _chs(base + start + size - 1), start, size)


def _chs(lba):
    # type: (int) -> bytes
    cylinder = lba // (HEADS * TRACK_SECTORS)
    if cylinder > 1023:
        return CHS_MAX
    head = (lba // TRACK_SECTORS) % HEADS
    sector = lba % TRACK_SECTORS + 1
    return struct.pack("BBB", head, sector | ((cylinder >> 2) & 0xC0), cylinder & 0xFF)


def hex_id(sector0):
    # type: (bytes) -> str
    """The disk identifier in sector0, as stored (byte order of the disk)."""
    return binascii.hexlify(sector0[DISK_ID_OFFSET:DISK_ID_OFFSET + 4]).decode("ascii")
