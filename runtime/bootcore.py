"""The flasher's own way to boot while stage 2 writes: a GRUB core.img that finds the
flasher's kernel by its filesystem's UUID and needs nothing of the old /boot, and the sector
0 whose boot code leads to it.

Stage 2 overwrites the old root filesystem, /boot/grub with it, long before it writes
resinOS's own first sectors; from its first write the old GRUB's core.img would stop at a
rescue prompt. So stage 1 makes, with the device's own GRUB (grub-mkimage and
/usr/lib/grub/i386-pc/boot.img, the versions that match each other):

- a core.img whose embedded configuration searches for the kernel's filesystem by UUID,
  loads the flasher's kernel with its arguments and boots it (and reboots, to try again,
  should that fail), written into the unpartitioned MiB before the flash partitions, which
  the image never reaches;
- the sector 0 that boots it: GRUB's boot.img with the first sector of that core.img in
  kernel_sector and core.img's first blocklist pointing at the rest, as grub-bios-setup
  installs a core.img kept outside the MBR gap; the disk's own BIOS parameter block, disk
  identifier and partition table kept (offsets from GRUB's include/grub/i386/pc/boot.h and
  util/setup.c, the same from 2.00 to 2.12).

Stage 2 writes that sector 0 (one sector, after saving the one it replaces) just before its
point of no return, and resinOS's own sector 0 last of all.
"""

import os
import struct

from .blockdev import read_sectors
from .errors import MigrateError
from .files import ENCODING, ERRORS

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import List, Optional  # noqa: F401  # novermin

    from .grub import Chroot  # noqa: F401
    from .manifest import Boot  # noqa: F401

SECTOR = 512
GRUB_DIR = "usr/lib/grub/i386-pc"
#: What the embedded configuration runs: the partition table, both filesystems the kernel
#: can be on, the search by UUID, the kernel loader, and a way to try again.
MODULES = ("biosdisk", "part_msdos", "fat", "ext2", "search", "search_fs_uuid", "linux",
           "echo", "sleep", "reboot")
# boot.img: the BIOS parameter block stays the disk's; then the LBA of core.img's first
# sector; the drive (0xff: the one the BIOS booted); the jump that trusted a floppy's drive
# number, replaced by two NOPs for a hard disk; disk identifier and table stay the disk's.
BPB_START, BPB_END = 0x03, 0x5a
KERNEL_SECTOR = 0x5c
BOOT_DRIVE = 0x64
DRIVE_CHECK = 0x66
DISK_ID = 0x1b8
BOOT_IMG_MESSAGE = b"GRUB "
# diskboot.img (core.img's first sector) ends with its first blocklist: the LBA of the
# rest of core.img (grub-mkimage leaves 2: right after an MBR gap's first sector), its
# length in sectors, the segment it is loaded at.
BLOCKLIST = SECTOR - 12
DISKBOOT_MESSAGE = b"loading"


class BootCoreError(MigrateError):
    exit_code = 11


def early_config(boot, fs_uuid):
    # type: (Boot, str) -> str
    """The configuration embedded in core.img: GRUB's rescue parser runs it line by line
    before anything is read from a disk. Every value comes from the validated manifest and
    blkid."""
    lines = ["search --no-floppy --fs-uuid --set=root {}".format(fs_uuid),
             "linux {} {}".format(boot.kernel, boot.cmdline)]
    if boot.initrd:
        lines.append("initrd {}".format(boot.initrd))
    lines += ["boot",
              "echo resin-migrate: the flasher did not boot; trying again in 10 s",
              "sleep 10",
              "reboot", ""]
    return "\n".join(lines)


def make_core(chroot, sysroot, boot, fs_uuid):
    # type: (Chroot, str, Boot, str) -> bytes
    """core.img by the device's grub-mkimage (in its root: sysroot), the early configuration
    embedded."""
    from .grub import Scratch
    with Scratch(sysroot) as scratch:
        with open(scratch.path("early.cfg"), "w", encoding=ENCODING, errors=ERRORS) as handle:
            handle.write(early_config(boot, fs_uuid))
        chroot.run(["grub-mkimage", "-O", "i386-pc", "-d", "/" + GRUB_DIR,
                    "-c", scratch.inside(scratch.path("early.cfg")), "-p", "(hd0)/",
                    "-o", scratch.inside(scratch.path("core.img"))] + list(MODULES))
        with open(scratch.path("core.img"), "rb") as handle:
            return handle.read()


def place_core(core, start):
    # type: (bytes, int) -> bytes
    """core.img made to be loaded from sector start: its first blocklist points at the
    sectors after its first, the whole padded to sectors."""
    if len(core) < 2 * SECTOR or DISKBOOT_MESSAGE not in core[:SECTOR]:
        raise BootCoreError("grub-mkimage made no i386-pc core.img (its first sector is not "
                            "GRUB's diskboot)")
    sectors = -(-len(core) // SECTOR)
    first, length, segment = struct.unpack("<QHH", core[BLOCKLIST:SECTOR])
    if first != 2 or length != sectors - 1:
        raise BootCoreError("core.img's first blocklist is {}+{}, not the 2+{} grub-mkimage "
                            "writes: an unknown GRUB".format(first, length, sectors - 1))
    placed = bytearray(core) + bytearray(sectors * SECTOR - len(core))
    placed[BLOCKLIST:SECTOR] = struct.pack("<QHH", start + 1, length, segment)
    return bytes(placed)


def armed_mbr(boot_img, sector0, core_start):
    # type: (bytes, bytes, int) -> bytes
    """The sector 0 that boots the core.img at core_start: GRUB's boot.img as
    grub-bios-setup writes it to a hard disk, around this disk's BPB, identifier and table."""
    if len(boot_img) != SECTOR or BOOT_IMG_MESSAGE not in boot_img[:DISK_ID]:
        raise BootCoreError("{} is not GRUB's i386-pc boot.img".format(GRUB_DIR + "/boot.img"))
    if len(sector0) != SECTOR or sector0[510:] != b"\x55\xaa":
        raise BootCoreError("sector 0 holds no partition table (no 55aa signature)")
    mbr = bytearray(boot_img)
    mbr[BPB_START:BPB_END] = sector0[BPB_START:BPB_END]
    mbr[KERNEL_SECTOR:KERNEL_SECTOR + 8] = struct.pack("<Q", core_start)
    mbr[BOOT_DRIVE] = 0xff
    mbr[DRIVE_CHECK:DRIVE_CHECK + 2] = b"\x90\x90"
    mbr[DISK_ID:] = sector0[DISK_ID:]
    return bytes(mbr)


def grub_in_mbr(disk):
    # type: (str) -> Optional[str]
    """Why sector 0 of disk does not start GRUB from this disk, or None when it does: its
    boot code is GRUB's boot.img and the sector boot.img loads holds GRUB's diskboot."""
    try:
        sector0 = read_sectors(disk, 0, 1)
        core = struct.unpack("<Q", sector0[KERNEL_SECTOR:KERNEL_SECTOR + 8])[0]
        loaded = read_sectors(disk, core, 1)
    except (EnvironmentError, struct.error) as exc:
        return "cannot read the boot code of {}: {}".format(disk, exc)
    if len(sector0) != SECTOR or sector0[510:] != b"\x55\xaa":
        return "sector 0 of {} has no boot signature".format(disk)
    if BOOT_IMG_MESSAGE not in sector0[:DISK_ID]:
        return "the boot code in the MBR of {} is not GRUB's".format(disk)
    if DISKBOOT_MESSAGE not in loaded:
        return ("the MBR of {} holds GRUB's boot code, but sector {} it loads is no GRUB "
                "core.img: GRUB was installed elsewhere since".format(disk, core))
    return None


#: Block devices no BIOS boots from: their sector 0 is not boot code.
VIRTUAL_DISKS = ("loop", "ram", "zram", "dm-", "md", "sr", "fd", "nbd", "rbd")


def whole_disks(sys_block="/sys/block"):
    # type: (str) -> List[str]
    """The disks the BIOS could boot: /sys/block without the virtual ones."""
    found = []
    for name in sorted(os.listdir(sys_block)):
        if not name.startswith(VIRTUAL_DISKS):
            found.append("/dev/" + name)
    return found


def disks_with_boot_code(disks):
    # type: (List[str]) -> List[str]
    """Those of disks whose sector 0 carries boot code (a boot signature and a non-zero
    first 440 bytes): a BIOS could start them instead. Unreadable or empty ones (a card
    reader without a card) carry none."""
    found = []
    for disk in disks:
        try:
            sector0 = read_sectors(disk, 0, 1)
        except EnvironmentError:
            continue
        signed = len(sector0) == SECTOR and sector0[510:] == b"\x55\xaa"
        if signed and sector0[:DISK_ID].strip(b"\0"):
            found.append(disk)
    return found
