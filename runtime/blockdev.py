"""A disk as sectors: reading and writing them, its size, and telling the running kernel
about one partition with the BLKPG ioctl, all with the standard library (os, fcntl,
struct, array), so that no util-linux version matters.

BLKPG adds or deletes one partition of a disk whose other partitions are mounted: the
kernel refuses to re-read a whole table (BLKRRPART) while / is on the disk, and this is
what partx and parted do instead. Constants and structures from the kernel's
include/uapi/linux/blkpg.h and include/uapi/linux/fs.h (the same since Linux 2.6).
"""

import array
import errno
import fcntl
import hashlib
import os
import struct

from .errors import MigrateError

SECTOR = 512
BLKPG = 0x1269              # _IO(0x12, 105)
BLKPG_ADD_PARTITION = 1
BLKPG_DEL_PARTITION = 2
BLKSSZGET = 0x1268          # _IO(0x12, 104): logical sector size, an int
# struct blkpg_partition { long long start, length; int pno; char devname[64], volname[64]; }
# in bytes, padded to the alignment of long long ("0q"), as the C compiler pads it
BLKPG_PARTITION = struct.Struct("qqi64s64s0q")
# struct blkpg_ioctl_arg { int op; int flags; int datalen; void *data; }
BLKPG_ARG = struct.Struct("iiiP")


class BlockDeviceError(MigrateError):
    exit_code = 11


def read_sectors(disk, start, count):
    # type: (str, int, int) -> bytes
    fd = os.open(disk, os.O_RDONLY)
    try:
        os.lseek(fd, start * SECTOR, os.SEEK_SET)
        data = b""
        while len(data) < count * SECTOR:
            chunk = os.read(fd, count * SECTOR - len(data))
            if not chunk:
                break
            data += chunk
        return data
    finally:
        os.close(fd)


def write_sectors(disk, start, data):
    # type: (str, int, bytes) -> None
    """data at sector start of disk, synced, then read back after the cache is dropped."""
    fd = os.open(disk, os.O_WRONLY)
    try:
        os.lseek(fd, start * SECTOR, os.SEEK_SET)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        try:
            os.posix_fadvise(fd, start * SECTOR, len(data), os.POSIX_FADV_DONTNEED)
        except (AttributeError, OSError):  # Python 3.4: no posix_fadvise; read back anyway
            pass
    finally:
        os.close(fd)
    back = read_sectors(disk, start, len(data) // SECTOR)
    if hashlib.sha256(back).hexdigest() != hashlib.sha256(data).hexdigest():
        raise BlockDeviceError("{}: sectors {}-{} read back different from what was written"
                               .format(disk, start, start + len(data) // SECTOR - 1))


def size_sectors(disk):
    # type: (str) -> int
    """The disk's size in 512-byte sectors (a block device or an image file)."""
    fd = os.open(disk, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END) // SECTOR
    finally:
        os.close(fd)


def sector_size(disk):
    # type: (str) -> int
    """The logical sector size the kernel addresses the disk in; 512 for an image file."""
    if not os.path.exists(disk) or os.path.isfile(disk):
        return SECTOR
    fd = os.open(disk, os.O_RDONLY)
    try:
        buffer = array.array("i", [0])
        fcntl.ioctl(fd, BLKSSZGET, buffer, True)
        return buffer[0]
    except (IOError, OSError):
        return SECTOR
    finally:
        os.close(fd)


def blkpg(disk, operation, number, start=0, size=0):
    # type: (str, int, int, int, int) -> None
    """One BLKPG_ADD_PARTITION or BLKPG_DEL_PARTITION on disk (start and size in sectors).

    Raises OSError as the kernel answers: EBUSY for a partition in use (or one that
    overlaps), ENXIO for a number it does not have, EINVAL or ENOTTY where the device
    takes no partitions (a loop device without partition support) or the call itself is
    wrong for this machine.
    """
    data = array.array("b", BLKPG_PARTITION.pack(start * SECTOR, size * SECTOR, number,
                                                b"", b""))
    address, _length = data.buffer_info()
    argument = bytearray(BLKPG_ARG.pack(operation, 0, BLKPG_PARTITION.size, address))
    fd = os.open(disk, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, BLKPG, argument, True)
    finally:
        os.close(fd)
    del data        # kept alive until the kernel has read it


def is_busy(exc):
    # type: (EnvironmentError) -> bool
    return exc.errno == errno.EBUSY
