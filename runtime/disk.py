"""Partition tables of the device's disk: read with sfdisk, written with sfdisk, and the
kernel told about each change with partx (BLKPG), since nothing re-reads a table while
the root filesystem on that disk is mounted.
"""

import binascii
import json
import os
import time

from .errors import MigrateError
from .run import run
from .system import partition_path

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Dict, List, Optional  # noqa: F401  # novermin

SECTOR = 512
EXTENDED_TYPES = ("5", "f", "85")
SWAP_TYPE = "82"
LINUX_TYPE = "83"
FAT16_LBA_TYPE = "e"


class DiskError(MigrateError):
    exit_code = 11


class TablePartition(object):
    """A partition as sfdisk reports it (sectors of 512 bytes)."""

    def __init__(self, node, number, start, size, type_, bootable):
        # type: (str, int, int, int, str, bool) -> None
        self.node = node
        self.number = number
        self.start = start
        self.size = size
        self.type = type_.lower().lstrip("0") or "0"
        self.bootable = bootable

    @property
    def end(self):
        # type: () -> int
        return self.start + self.size

    @property
    def is_extended(self):
        # type: () -> bool
        return self.type in EXTENDED_TYPES

    @property
    def is_logical(self):
        # type: () -> bool
        return self.number > 4

    def __repr__(self):
        return "TablePartition({} {}+{} type {})".format(
            self.node, self.start, self.size, self.type)


class Table(object):
    """A disk's partition table."""

    def __init__(self, disk, label, sectors, partitions, sector_size=SECTOR):
        # type: (str, str, int, List[TablePartition], int) -> None
        self.disk = disk
        self.label = label                # 'dos' or 'gpt'
        self.sectors = sectors            # disk size in 512-byte sectors
        self.partitions = partitions
        self.sector_size = sector_size

    def number(self, number):
        # type: (int) -> Optional[TablePartition]
        for part in self.partitions:
            if part.number == number:
                return part
        return None

    @property
    def extended(self):
        # type: () -> Optional[TablePartition]
        for part in self.partitions:
            if part.is_extended:
                return part
        return None

    @property
    def primaries(self):
        # type: () -> List[TablePartition]
        return [part for part in self.partitions if not part.is_logical]


def read_table(disk):
    # type: (str) -> Table
    """The table on disk, as sfdisk reads it from the device (not from the kernel)."""
    result = run(["sfdisk", "--json", disk], check=False)
    if result.returncode != 0:
        if "does not contain a recognized partition table" in result.stderr:
            return Table(disk, "none", disk_sectors(disk), [])
        raise DiskError("cannot read the partition table of {}: {}".format(
            disk, result.stderr.strip()))
    data = json.loads(result.stdout)["partitiontable"]
    parts = []
    for entry in data.get("partitions", []):
        node = entry["node"]
        number = partition_number(disk, node)
        parts.append(TablePartition(node, number, int(entry["start"]), int(entry["size"]),
                                    str(entry.get("type", "0")),
                                    bool(entry.get("bootable", False))))
    return Table(disk, data["label"], disk_sectors(disk), parts,
                 int(data.get("sectorsize", SECTOR)))


def partition_number(disk, node):
    # type: (str, str) -> int
    """/dev/sda + /dev/sda5 -> 5; /dev/loop3 + /dev/loop3p5 -> 5 (as sfdisk names them)."""
    return int(node.strip()[len(disk):].lstrip("p"))


def disk_sectors(disk):
    # type: (str) -> int
    """Size of the disk in 512-byte sectors."""
    if os.path.isfile(disk):
        return os.path.getsize(disk) // SECTOR
    return int(run(["blockdev", "--getsz", disk]).stdout.strip())


def dump(disk):
    # type: (str) -> str
    """`sfdisk -d`: the text that recreates the table exactly."""
    return run(["sfdisk", "-d", disk]).stdout


def probe(device):
    # type: (str) -> Dict[str, str]
    """blkid's low-level probe of a device (TYPE, UUID, LABEL, ...), bypassing its cache."""
    result = run(["blkid", "-p", "-o", "export", device], ok_codes=(0, 2))
    values = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value
    return values


def probe_partuuid(device):
    # type: (str) -> Optional[str]
    return probe(device).get("PART_ENTRY_UUID")


def devices_with_label(label):
    # type: (str) -> List[str]
    """Every block device whose filesystem carries label (blkid, bypassing its cache)."""
    result = run(["blkid", "-c", "/dev/null", "-o", "device", "-t", "LABEL=" + label],
                 ok_codes=(0, 2))
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def sfdisk_missing_features():
    # type: () -> List[str]
    """The sfdisk options this runtime needs that the installed sfdisk lacks."""
    text = run(["sfdisk", "--help"], check=False).stdout
    return [option for option in ("--json", "--no-tell-kernel") if option not in text]


def identity(disk):
    # type: (str) -> dict
    """What tells this disk from another that took its name: size and MBR disk identifier."""
    with open(disk, "rb") as handle:
        mbr = handle.read(512)
    return {"sectors": disk_sectors(disk),
            "disk_id": binascii.hexlify(mbr[440:444]).decode("ascii")}


def write_script(disk, script):
    # type: (str, str) -> None
    """Write a whole table from an sfdisk script, without asking the kernel to re-read it.

    The kernel refuses a re-read while a partition of the disk is mounted; tell_kernel()
    then updates the partitions that changed, one by one.
    """
    run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", disk], input_text=script)
    run(["sync"])


def kernel_partitions(disk):
    # type: (str) -> Dict[int, tuple]
    """{number: (start, size)} as the kernel sees the disk's partitions now (sysfs)."""
    name = os.path.basename(os.path.realpath(disk))
    base = os.path.join("/sys/class/block", name)
    found = {}
    for entry in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        part_file = os.path.join(base, entry, "partition")
        if os.path.exists(part_file):
            with open(part_file) as handle:
                number = int(handle.read().strip())
            with open(os.path.join(base, entry, "start")) as handle:
                start = int(handle.read().strip())
            with open(os.path.join(base, entry, "size")) as handle:
                size = int(handle.read().strip())
            found[number] = (start, size)
    return found


def tell_kernel(disk, table):
    # type: (str, Table) -> None
    """Make the kernel's partitions of disk match table: delete what differs, add what is new.

    partx issues BLKPG ioctls, which work on a disk whose root partition is mounted, as
    long as the partitions changed are not in use.
    """
    current = kernel_partitions(disk)
    wanted = dict((part.number, (part.start, part.size)) for part in table.partitions)
    for number in sorted(current, reverse=True):
        if number not in wanted or _differs(current[number], wanted[number], number, table):
            _delete_partition(disk, number)
    current = kernel_partitions(disk)
    for number in sorted(wanted):
        if number not in current:
            run(["partx", "--add", "--nr", str(number), disk])
    _wait_for_nodes(disk, table)


def _delete_partition(disk, number, tries=10):
    # type: (str, int, int) -> None
    """partx --delete, tried again for a few seconds: right after a filesystem on the
    partition is unmounted (the journal replayed by `status`'s read-only mount, say), udev
    probes it again and holds it open for a moment, and the kernel answers EBUSY."""
    from .errors import CommandError
    from .run import which
    for attempt in range(1, tries + 1):
        try:
            run(["partx", "--delete", "--nr", str(number), disk])
            return
        except CommandError as exc:
            if attempt == tries:
                raise DiskError("the kernel keeps partition {} of {} in use ({}); {}".format(
                    number, disk, str(exc).splitlines()[0], _users(partition_path(
                        disk, number)))) from exc
        if which("udevadm"):
            run(["udevadm", "settle", "--timeout=5"], check=False)
        time.sleep(0.2 * attempt)


def _users(node):
    # type: (str) -> str
    """What holds a partition: mounts, swap, device-mapper or md holders, as a sentence."""
    found = []
    real = os.path.realpath(node)
    for path, column in (("/proc/mounts", 0), ("/proc/swaps", 0)):
        try:
            with open(path) as handle:
                for line in handle.read().splitlines():
                    fields = line.split()
                    if fields and os.path.realpath(fields[column]) == real:
                        found.append("{} in {}".format(line.strip(), path))
        except EnvironmentError:
            continue
    holders = os.path.join("/sys/class/block", os.path.basename(real), "holders")
    if os.path.isdir(holders) and os.listdir(holders):
        found.append("held by " + ", ".join(sorted(os.listdir(holders))))
    return ("it is " + "; ".join(found) + ": stop that, then run the command again") \
        if found else "nothing seems to hold it: run the command again in a moment"


def _differs(seen, wanted, number, table):
    # type: (tuple, tuple, int, Table) -> bool
    part = table.number(number)
    if part is not None and part.is_extended:
        # the kernel shows an extended partition as 1 KiB (1 or 2 sectors) long; a partition
        # of full size at that number is something else (the swap it replaces)
        return seen[0] != wanted[0] or seen[1] not in (1, 2)
    return seen != wanted


def _wait_for_nodes(disk, table, timeout=10.0):
    # type: (str, Table, float) -> None
    """Wait for udev to create the /dev nodes of the table's partitions; make them if it won't."""
    deadline = time.time() + timeout
    missing = []
    while time.time() < deadline:
        missing = [part for part in table.partitions
                   if not os.path.exists(partition_path(disk, part.number))]
        if not missing:
            return
        time.sleep(0.2)
    for part in missing:
        sys_dev = os.path.join("/sys/class/block",
                               os.path.basename(partition_path(disk, part.number)), "dev")
        if os.path.exists(sys_dev):
            with open(sys_dev) as handle:
                major, minor = handle.read().strip().split(":")
            os.mknod(partition_path(disk, part.number), 0o660 | 0o060000,
                     os.makedev(int(major), int(minor)))
        else:
            raise DiskError("the kernel has no partition {} of {} after partx --add".format(
                part.number, disk))
