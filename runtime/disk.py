"""The device's disk and its partition table: read and written sector by sector through
the one model of runtime/mbr.py, the running kernel told about each changed partition
with BLKPG (runtime/blockdev.py; partx where the ioctl is refused), since nothing re-reads
a table while the root filesystem on that disk is mounted.
"""

import binascii
import errno
import json
import os
import time

from . import blockdev, mbr
from .errors import MigrateError
from .files import read_text, write_atomic
from .run import log, run, which
from .system import partition_path

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Dict, List, Optional  # noqa: F401  # novermin


class DiskError(MigrateError):
    exit_code = 11


def read_table(disk):
    # type: (str) -> mbr.Table
    """The table on disk, as its sectors hold it (not as the kernel last saw it)."""
    def read(sector):
        # type: (int) -> bytes
        return blockdev.read_sectors(disk, sector, 1)
    try:
        return mbr.decode(read, blockdev.size_sectors(disk))
    except EnvironmentError as exc:
        raise DiskError("cannot read the partition table of {}: {}".format(disk, exc)) from exc


def records(disk, *tables):
    # type: (str, *mbr.Table) -> Dict[int, bytes]
    """What disk holds now in every sector where one of tables keeps its records (sector 0,
    each EBR, the extended partition's first sector): what rollback writes back."""
    sectors = set([0])
    for table in tables:
        sectors.update(table.ebrs.values())
        if table.extended is not None:
            sectors.add(table.extended.start)
    return dict((sector, blockdev.read_sectors(disk, sector, 1)) for sector in sorted(sectors))


def save_records(path, saved):
    # type: (str, Dict[int, bytes]) -> None
    write_atomic(path, json.dumps(dict(
        (str(sector), binascii.hexlify(data).decode("ascii"))
        for sector, data in sorted(saved.items())), indent=1, sort_keys=True) + "\n")


def load_records(path):
    # type: (str) -> Dict[int, bytes]
    data = json.loads(read_text(path))
    return dict((int(sector), binascii.unhexlify(text)) for sector, text in data.items())


def write_table(disk, table):
    # type: (str, mbr.Table) -> None
    """Write table's sectors that differ from the disk's, then read the table back.

    Highest sector first: new EBRs lie beyond the records that will link them (an EBR
    earlier in the chain, or sector 0), so until that one sector is written the disk still
    holds the old table whole, and a power cut leaves one table or the other.
    """
    def current(sector):
        # type: (int) -> bytes
        return blockdev.read_sectors(disk, sector, 1)
    wanted = mbr.encode(table, current)
    for sector in sorted(wanted, reverse=True):
        if current(sector) != wanted[sector]:
            blockdev.write_sectors(disk, sector, wanted[sector])
    written = read_table(disk)
    if written.entries() != table.entries():
        raise DiskError("the partition table read back from {} differs from the one "
                        "written: {} instead of {}".format(disk, written.entries(),
                                                           table.entries()))


def restore_records(disk, saved):
    # type: (str, Dict[int, bytes]) -> None
    """Put saved sectors back, sector 0 first (from then on the table no longer reaches
    the EBRs stage 1 added), and check every one byte for byte."""
    for sector in sorted(saved):
        if blockdev.read_sectors(disk, sector, 1) != saved[sector]:
            blockdev.write_sectors(disk, sector, saved[sector])
    differ = [sector for sector in sorted(saved)
              if blockdev.read_sectors(disk, sector, 1) != saved[sector]]
    if differ:
        raise DiskError("sectors {} of {} read back different from the ones saved before "
                        "stage 1".format(", ".join(str(s) for s in differ), disk))


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


def devices_with_label(label):
    # type: (str) -> List[str]
    """Every block device whose filesystem carries label (blkid, bypassing its cache)."""
    result = run(["blkid", "-c", "/dev/null", "-o", "device", "-t", "LABEL=" + label],
                 ok_codes=(0, 2))
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def identity(disk):
    # type: (str) -> dict
    """What tells this disk from another that took its name: size and MBR disk identifier."""
    return {"sectors": blockdev.size_sectors(disk),
            "disk_id": mbr.hex_id(blockdev.read_sectors(disk, 0, 1))}


def kernel_partitions(disk):
    # type: (str) -> Dict[int, tuple]
    """{number: (start, size)} as the kernel sees the disk's partitions now (sysfs)."""
    name = os.path.basename(os.path.realpath(disk))
    base = os.path.join("/sys/class/block", name)
    found = {}
    for entry in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        part_file = os.path.join(base, entry, "partition")
        if os.path.exists(part_file):
            number, start, size = (_sysfs_int(os.path.join(base, entry, field))
                                   for field in ("partition", "start", "size"))
            found[number] = (start, size)
    return found


def _sysfs_int(path):
    # type: (str) -> int
    with open(path, encoding="ascii") as handle:
        return int(handle.read().strip())


def tell_kernel(disk, table):
    # type: (str, mbr.Table) -> None
    """Make the kernel's partitions of disk match table: delete what differs, add what is
    new, one partition at a time (BLKPG), which works on a disk whose root partition is
    mounted as long as the partitions changed are not in use."""
    current = kernel_partitions(disk)
    wanted = dict((part.number, _kernel_extent(part)) for part in table.partitions)
    for number in sorted(current, reverse=True):
        if number not in wanted or current[number] != wanted[number]:
            _delete_partition(disk, number)
    current = kernel_partitions(disk)
    for number in sorted(wanted):
        if number not in current:
            _add_partition(disk, number, *wanted[number])
    _wait_for_nodes(disk, table)


def _kernel_extent(part):
    # type: (mbr.Partition) -> tuple
    """(start, size) as the kernel's own reader registers a partition: an extended one as
    its first 2 sectors only (block/partitions/msdos.c), so nothing writes across it."""
    return (part.start, min(part.size, 2) if part.kind == "extended" else part.size)


def _add_partition(disk, number, start, size):
    # type: (str, int, int, int) -> None
    try:
        blockdev.blkpg(disk, blockdev.BLKPG_ADD_PARTITION, number, start, size)
    except EnvironmentError as exc:
        if blockdev.is_busy(exc):
            raise DiskError("the kernel refuses partition {} of {} (sectors {}-{}): it "
                            "overlaps one it still has ({})".format(
                                number, disk, start, start + size - 1, exc)) from exc
        _partx_instead(exc, ["partx", "--add", "--nr", str(number), disk])


def _delete_partition(disk, number, tries=10):
    # type: (str, int, int) -> None
    """BLKPG_DEL_PARTITION, tried again for a few seconds: right after a filesystem on the
    partition is unmounted (the journal replayed by `status`'s read-only mount, say), udev
    probes it again and holds it open for a moment, and the kernel answers EBUSY."""
    for attempt in range(1, tries + 1):
        try:
            blockdev.blkpg(disk, blockdev.BLKPG_DEL_PARTITION, number)
            return
        except EnvironmentError as exc:
            if exc.errno == errno.ENXIO:
                return          # gone already
            if not blockdev.is_busy(exc):
                _partx_instead(exc, ["partx", "--delete", "--nr", str(number), disk])
                return
            if attempt == tries:
                raise DiskError("the kernel keeps partition {} of {} in use ({}); {}".format(
                    number, disk, exc, _users(partition_path(disk, number)))) from exc
            log.debug("partition %d of %s is busy (try %d of %d): asking again", number,
                      disk, attempt, tries)
        if which("udevadm"):
            run(["udevadm", "settle", "--timeout=5"], check=False)
        time.sleep(0.2 * attempt)


def _partx_instead(exc, argv):
    # type: (EnvironmentError, list) -> None
    """The ioctl was refused for another reason than a partition in use (a kernel or a
    C library whose structures differ): partx makes the same call its own way."""
    from .errors import CommandError
    if not which("partx"):
        raise DiskError("the kernel refused BLKPG ({}) and partx is not installed".format(
            exc)) from exc
    try:
        run(argv)
    except CommandError as failed:
        raise DiskError("the kernel refused BLKPG ({}), and partx too: {}".format(
            exc, failed)) from failed


def _users(node):
    # type: (str) -> str
    """What holds a partition: mounts, swap, device-mapper or md holders, as a sentence."""
    found = []
    real = os.path.realpath(node)
    for path, column in (("/proc/mounts", 0), ("/proc/swaps", 0)):
        try:
            text = read_text(path)
        except EnvironmentError:
            continue
        for line in text.splitlines():
            fields = line.split()
            if fields and os.path.realpath(fields[column]) == real:
                found.append("{} in {}".format(line.strip(), path))
    holders = os.path.join("/sys/class/block", os.path.basename(real), "holders")
    if os.path.isdir(holders) and os.listdir(holders):
        found.append("held by " + ", ".join(sorted(os.listdir(holders))))
    return ("it is " + "; ".join(found) + ": stop that, then run the command again") \
        if found else "nothing seems to hold it: run the command again in a moment"


def _wait_for_nodes(disk, table, timeout=10.0):
    # type: (str, mbr.Table, float) -> None
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
            with open(sys_dev, encoding="ascii") as handle:
                major, minor = handle.read().strip().split(":")
            os.mknod(partition_path(disk, part.number), 0o660 | 0o060000,
                     os.makedev(int(major), int(minor)))
        else:
            raise DiskError("the kernel has no partition {} of {} after adding it".format(
                part.number, disk))
