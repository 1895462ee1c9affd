"""The flasher kernel's filesystem in miniature, for stage 1 to read with the device's GRUB.

GRUB's filesystem drivers refuse features they do not know (an ext4 `incompat` flag newer
than the GRUB, for example: util-linux's mkfs defaults move faster than Ubuntu 14.04's
GRUB 2.02~beta2). A device whose GRUB cannot read the partition holding the flasher's
kernel would stop at its one-shot boot. Stage 1 can only read the real partition once it
has written it; so the bundle carries a probe: a small filesystem of the same type made
with the same features, block size and inode size as the flasher's own, holding a file
at the kernel's path. `check` reads that file through the device's `grub-fstest` before
anything changes (runtime/grub.py, read_probe); stage 1 reads the real kernel again once
it is written.

The probe is reproducible: fixed UUID, hash seed, clock and file contents.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from runtime.run import run

from .errors import FlasherLayoutError
from .fsedit import Ext4Image, FatImage

PROBE_NAME = "kernel-fs-probe"     # the stream's name, before its compression suffix
PROBE_MIB = 16                     # room for a journal of its own and the file
FILE_BYTES = 256 * 1024            # several extents' worth of blocks, in a subdirectory
UUID = "5ea1ed00-7e57-4000-8000-000000000001"
HASH_SEED = "5ea1ed00-7e57-4000-8000-000000000002"
FAT_VOLUME_ID = "5EA1ED00"
# Features that describe a filesystem's state, not its format: mke2fs does not take them
STATE_FEATURES = {"needs_recovery", "orphan_present"}


def file_bytes() -> bytes:
    """The probe file's contents: fixed, and not compressible into nothing."""
    return hashlib.shake_256(b"resin-migrate kernel filesystem probe").digest(FILE_BYTES)


def make_probe(kernel_fs: Ext4Image | FatImage, kernel_path: str, dest: Path,
               epoch: int) -> str:
    """Write the probe for the filesystem holding the kernel at kernel_path to dest; the
    sha256 of the file at kernel_path in it."""
    data = file_bytes()
    if isinstance(kernel_fs, Ext4Image):
        _make_ext4(kernel_fs, kernel_path, data, dest, epoch)
    else:
        _make_fat(kernel_fs, kernel_path, data, dest, epoch)
    return hashlib.sha256(data).hexdigest()


def ext4_format(image: Ext4Image) -> tuple[list[str], str, str]:
    """The features, block size and inode size of an ext4 image, from its superblock."""
    fields = image.superblock()
    features = [name for name in fields.get("Filesystem features", "").split()
                if name not in STATE_FEATURES]
    block_size, inode_size = fields.get("Block size"), fields.get("Inode size")
    if not features or not block_size or not inode_size:
        raise FlasherLayoutError(f"{image.name}: dumpe2fs gives no features, block size or "
                                 "inode size")
    return features, block_size, inode_size


def _make_ext4(source: Ext4Image, kernel_path: str, data: bytes, dest: Path,
               epoch: int) -> None:
    features, block_size, inode_size = ext4_format(source)
    dest.unlink(missing_ok=True)
    # "none" first: exactly the source's features, not mke2fs.conf's defaults; the file
    # goes in through debugfs with fixed times (mke2fs -d would copy the host's ctimes)
    run(["mke2fs", "-F", "-q", "-t", "ext4", "-O", "none," + ",".join(features),
         "-b", block_size, "-I", inode_size, "-U", UUID, "-E", f"hash_seed={HASH_SEED}",
         "-L", "probe", dest, f"{PROBE_MIB}M"], env={"E2FSPROGS_FAKE_TIME": str(epoch)})
    probe = Ext4Image(dest, epoch, name="the kernel filesystem probe")
    parts = kernel_path.strip("/").split("/")
    for depth in range(1, len(parts)):
        probe.mkdir("/" + "/".join(parts[:depth]), epoch)
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "file"
        copy.write_bytes(data)
        probe.put_file(copy, kernel_path, 0o644, 0, 0, epoch)
    probe.touch_dir("/", epoch)
    probe.check()
    if probe.read(kernel_path) != data:
        raise FlasherLayoutError(f"{probe.name}: {kernel_path} reads back different")
    if ext4_format(probe)[0] != features:
        raise FlasherLayoutError(f"{source.name}: mke2fs made the probe with the features "
                                 f"{ext4_format(probe)[0]}, not {features}")


def _make_fat(source: FatImage, kernel_path: str, data: bytes, dest: Path,
              epoch: int) -> None:
    fat_bits = _fat_bits(source.path)
    with dest.open("wb") as handle:
        handle.truncate(PROBE_MIB << 20)
    run(["mkfs.fat", "-F", str(fat_bits), "-i", FAT_VOLUME_ID, "-n", "PROBE", "--invariant",
         dest])
    probe = FatImage(dest, epoch, name="the kernel filesystem probe")
    parts = kernel_path.strip("/").split("/")
    for depth in range(1, len(parts)):
        probe.mkdir("/" + "/".join(parts[:depth]))
    probe.put(data, kernel_path)
    probe.check()


def _fat_bits(image: Path) -> int:
    """12, 16 or 32: the FAT type the boot sector names (FAT32 at 0x52, others at 0x36)."""
    with image.open("rb") as handle:
        sector = handle.read(512)
    for offset in (0x36, 0x52):
        name = sector[offset:offset + 8].decode("ascii", "replace").strip()
        if name in ("FAT12", "FAT16", "FAT32"):
            return int(name[3:])
    return 16
