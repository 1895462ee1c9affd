"""Rootless, deterministic builders of synthetic resinOS and intel-nuc flasher images.

The images have the *shape* of the real ones (see /work/shared/REFERENCE.md): msdos
table with 4 MiB alignment, the same partition numbers, types, flags and labels, FAT16
and ext4 where the real images have them, and the same file paths and flag files. The
contents are small pseudo-random or text-like stand-ins, so a build takes seconds.

No root, no loop devices, no mounts: sfdisk on a regular file, ``mkfs.ext4 -d`` and
``debugfs`` for ext4, ``mkfs.fat`` and mtools for FAT16, each filesystem built in its
own file and copied (sparse) to its offset. Building twice gives byte-identical files:
fixed UUIDs, volume ids, disk id and seeds, and fixed times (``E2FSPROGS_FAKE_TIME``,
``SOURCE_DATE_EPOCH``, pinned inode times).

Standard library only. Run ``python3 tests/synthetic.py OUT_PATH`` to write a default
flasher by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import logging
import os
import random
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import uuid
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

__all__ = [
    "INNER_NAME",
    "FlasherSpec",
    "SyntheticImageError",
    "CommandError",
    "build_resinos_image",
    "build_flasher_image",
    "cached_flasher",
    "cache_dir",
]

log = logging.getLogger(__name__)

INNER_NAME = "resin-image-genericx86-64.resinos-img"

#: Every timestamp in the images: 2020-01-01T00:00:00Z.
EPOCH = 1_577_836_800

SECTOR = 512
KiB = 1 << 10
MiB = 1 << 20
#: Partition alignment of the real images; also the reserved area before partition 1.
ALIGN = 4 * MiB

# resinOS image (sizes kept small; the shape follows REFERENCE.md)
_RESIN_BOOT_SIZE = 40 * MiB
_RESIN_ROOT_SIZE = 48 * MiB
_RESIN_STATE_SIZE = 20 * MiB
_RESIN_DATA_SIZE = 64 * MiB
_BOOT_CODE_LEN = 440  # MBR bytes 0..439; 440..445 disk id, 446.. the table
_CORE_IMG_LEN = 1 * MiB - SECTOR  # "core.img" stand-in, sectors 1.. up to 1 MiB

# flasher image
_FLASH_BOOT_SIZE = 40 * MiB  # 81920 sectors, as in the real flasher
_FLASH_ROOTB_SIZE = 4 * MiB
_FLASH_STATE_SIZE = 4 * MiB
_FLASH_DATA_SIZE = 8 * MiB
_FLASH_KERNEL_SIZE = 2 * MiB
_ROOTA_FREE_FACTOR = 1.4  # contents plus ~40 % free, like an unmodified flasher
_ROOTA_OVERHEAD = 16 * MiB  # journal, inode tables, directories

_TYPE_FAT16_LBA = "e"
_TYPE_LINUX = "83"
_TYPE_EXTENDED_LBA = "f"

# Pinned mkfs.ext4 defaults, so the host's /etc/mke2fs.conf does not change the result.
_MKE2FS_CONF = """\
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384

[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
"""


# --------------------------------------------------------------------------- errors


class SyntheticImageError(Exception):
    """Base of every error raised while building a synthetic image."""


class CommandError(SyntheticImageError):
    """An external command failed (or reported an error on a zero exit code)."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(
            f"command failed (exit code {returncode}): {shlex.join(self.argv)}\n"
            f"stderr: {stderr.strip()}"
        )


# --------------------------------------------------------------------------- commands


def _base_env() -> dict[str, str]:
    path = os.environ.get("PATH", "/usr/bin:/bin")
    # e2fsprogs, sfdisk and mkfs.fat live in sbin, often absent from a user's PATH.
    extra = [d for d in ("/usr/sbin", "/sbin") if d not in path.split(os.pathsep)]
    return {
        "PATH": os.pathsep.join([path, *extra]),
        "LC_ALL": "C",
        "TZ": "UTC",
        "SOURCE_DATE_EPOCH": str(EPOCH),  # mtools
        "E2FSPROGS_FAKE_TIME": str(EPOCH),  # e2fsprogs
        "MTOOLS_SKIP_CHECK": "1",
    }


def _run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    ok_codes: Iterable[int] = (0,),
) -> subprocess.CompletedProcess[str]:
    """Run one command in a minimal, fixed environment; raise CommandError on failure."""
    args = [os.fspath(a) for a in argv]
    full_env = _base_env()
    if env:
        full_env.update(env)
    log.debug("run: %s", shlex.join(args))
    try:
        proc = subprocess.run(
            args,
            input=stdin,
            capture_output=True,
            text=True,
            env=full_env,
            check=False,
        )
    except OSError as exc:
        raise CommandError(args, -1, str(exc)) from exc
    if proc.returncode not in tuple(ok_codes):
        raise CommandError(args, proc.returncode, proc.stderr)
    return proc


# --------------------------------------------------------------------------- content


def _digest(*parts: object) -> bytes:
    text = ":".join(str(p) for p in ("resin-migrate-synthetic", *parts))
    return hashlib.sha256(text.encode()).digest()


def _rng(*parts: object) -> random.Random:
    """A pseudo-random generator fixed by its name (independent of PYTHONHASHSEED)."""
    return random.Random(_digest(*parts))


def _fixed_uuid(*parts: object) -> str:
    return str(uuid.UUID(bytes=_digest(*parts)[:16], version=4))


def _fixed_u32(*parts: object) -> int:
    return int.from_bytes(_digest(*parts)[:4], "big") | 1  # never 0


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _random_bytes(size: int, *parts: object) -> bytes:
    """Incompressible content."""
    return _rng(*parts).randbytes(size)


_WORDS_TEXT = """
    the of and to in is for on with as by at from device kernel resin balena os image boot
    root state data partition flash grub linux module driver firmware network manager service
    system config json label disk sector block write read mount overlay supervisor container
    engine update rollback migrate swap alias pci usb ata nvme mmc ext4 vfat intel nuc generic
    x86 64 enable start stop
"""
_WORDS = _WORDS_TEXT.split()


def _text_bytes(size: int, *parts: object) -> bytes:
    """Compressible, text-like content (lines of words)."""
    rng = _rng(*parts)
    words = rng.choices(_WORDS, k=size // 5 + 16)
    lines = (" ".join(words[i : i + 12]) for i in range(0, len(words), 12))
    return "\n".join(lines).encode()[: size - 1] + b"\n"


def _png(*parts: object) -> bytes:
    """A small, valid 16x16 RGB PNG."""
    rng = _rng(*parts)
    width = height = 16
    raw = b"".join(b"\x00" + rng.randbytes(width * 3) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class _Part:
    number: int
    start: int  # sectors
    size: int  # sectors
    type: str  # sfdisk hex type without 0x
    bootable: bool = False

    @property
    def offset(self) -> int:
        return self.start * SECTOR

    @property
    def nbytes(self) -> int:
        return self.size * SECTOR

    @property
    def end(self) -> int:
        """First sector after the partition."""
        return self.start + self.size


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _msdos_layout(
    primaries: Sequence[tuple[int, str, bool]], logicals: Sequence[int]
) -> list[_Part]:
    """Partitions 1..3 primary, 4 extended (lba), 5.. logical; all 4 MiB aligned.

    Each logical partition starts 4 MiB after the previous end (the EBR lives in that
    gap), as in the real images.
    """
    align = ALIGN // SECTOR
    parts: list[_Part] = []
    cursor = align  # the first 4 MiB are reserved
    for number, (nbytes, ptype, bootable) in enumerate(primaries, start=1):
        if nbytes % ALIGN:
            raise SyntheticImageError(f"partition {number}: {nbytes} bytes is not 4 MiB aligned")
        parts.append(_Part(number, cursor, nbytes // SECTOR, ptype, bootable))
        cursor += nbytes // SECTOR
    ext_start = cursor
    logical_parts: list[_Part] = []
    for number, nbytes in enumerate(logicals, start=5):
        if nbytes % ALIGN:
            raise SyntheticImageError(f"partition {number}: {nbytes} bytes is not 4 MiB aligned")
        cursor += align  # EBR gap
        logical_parts.append(_Part(number, cursor, nbytes // SECTOR, _TYPE_LINUX))
        cursor += nbytes // SECTOR
    parts.append(_Part(len(primaries) + 1, ext_start, cursor - ext_start, _TYPE_EXTENDED_LBA))
    return parts + logical_parts


def _write_table(image: Path, parts: Sequence[_Part], label_id: int) -> None:
    lines = ["label: dos", f"label-id: 0x{label_id:08x}", "unit: sectors", ""]
    for p in parts:
        line = f"start={p.start}, size={p.size}, type={p.type}"
        lines.append(line + (", bootable" if p.bootable else ""))
    _run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", image],
        stdin="\n".join(lines) + "\n",
    )


def _new_sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _data_ranges(fd: int, size: int) -> Iterable[tuple[int, int]]:
    """(start, end) byte ranges of fd that may hold data (holes skipped where supported)."""
    if not hasattr(os, "SEEK_DATA"):
        yield 0, size
        return
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                return
            yield pos, size  # SEEK_DATA unsupported here
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def _place(src: Path, dst: Path, offset: int, length: int) -> None:
    """Copy src into dst at offset, writing only non-zero 64 KiB blocks (dst is zeroed)."""
    size = src.stat().st_size
    if size > length:
        raise SyntheticImageError(
            f"{src}: {size} bytes do not fit in {length} bytes at {offset} of {dst}"
        )
    block = 64 * KiB
    zero = bytes(block)
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        for start, end in _data_ranges(fin.fileno(), size):
            pos = start - start % block
            fin.seek(pos)
            while pos < end:
                chunk = fin.read(min(block, size - pos))
                if not chunk:
                    break
                if chunk != zero[: len(chunk)]:
                    fout.seek(offset + pos)
                    fout.write(chunk)
                pos += len(chunk)


# --------------------------------------------------------------------------- staging trees


class _Tree:
    """A host directory staged for ``mkfs.ext4 -d``, with fixed modes and times."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modes: dict[str, int] = {}
        root.mkdir(parents=True)

    def path(self, rel: str, mode: int = 0o644) -> Path:
        """Host path for rel (parents created); the file gets mode at seal()."""
        rel = rel.strip("/")
        self.modes[rel] = mode
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def file(self, rel: str, data: bytes, mode: int = 0o644) -> None:
        self.path(rel, mode).write_bytes(data)

    def dir(self, rel: str) -> None:
        self.path(rel).mkdir(exist_ok=True)

    def entries(self) -> list[str]:
        """Every path below the root, relative, sorted."""
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                out.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        return sorted(out)

    def apparent_size(self) -> int:
        """Bytes the tree takes when stored raw (no holes), in 4 KiB blocks."""
        total = 0
        for rel in self.entries():
            st = (self.root / rel).lstat()
            total += (
                _round_up(st.st_size, 4 * KiB) if not os.path.isdir(self.root / rel) else 4 * KiB
            )
        return total

    def seal(self) -> None:
        """Fix modes and mtimes/atimes of everything (ctime and owner: see _fix_inodes)."""
        for rel in reversed(self.entries()):  # children before parents
            p = self.root / rel
            if p.is_symlink():
                continue
            os.chmod(p, 0o755 if p.is_dir() else self.modes.get(rel, 0o644))
            os.utime(p, (EPOCH, EPOCH))
        os.chmod(self.root, 0o755)
        os.utime(self.root, (EPOCH, EPOCH))


# --------------------------------------------------------------------------- filesystems


def _mkfs_env(workdir: Path) -> dict[str, str]:
    conf = workdir / "mke2fs.conf"
    if not conf.exists():
        conf.write_text(_MKE2FS_CONF)
    return {"MKE2FS_CONFIG": str(conf)}


def _make_ext4(
    image: Path, size: int, label: str, seed: int, tree: _Tree | None, workdir: Path
) -> None:
    """Build an ext4 filesystem of size bytes in the file image, from tree if given."""
    fs_uuid = _fixed_uuid(seed, "ext4", label)
    blocksize = 4096 if size >= 16 * MiB else 1024
    argv: list[str | os.PathLike[str]] = ["mkfs.ext4", "-q", "-F", "-t", "ext4"]
    argv += ["-b", str(blocksize), "-L", label, "-U", fs_uuid]
    argv += ["-E", f"hash_seed={fs_uuid},root_owner=0:0"]
    if tree is not None:
        tree.seal()
        argv += ["-d", tree.root]
    argv += [image, f"{size // KiB}k"]
    if image.exists():
        image.unlink()
    env = _mkfs_env(workdir)
    _run(argv, env=env)
    if tree is not None:
        _fix_inodes(image, tree, workdir)
    _run(["e2fsck", "-fn", image])


def _fix_inodes(image: Path, tree: _Tree, workdir: Path) -> None:
    """Make every inode root-owned with pinned times, drop host xattrs.

    mkfs.ext4 -d copies the host uid/gid, the host ctime and the host xattrs; debugfs
    sets them to fixed values. debugfs exits 0 on failed commands: any stderr line other
    than its banner is an error.
    """
    cmds = []
    for rel in ["", *tree.entries()]:
        target = "/" + rel
        q = '"' + target.replace('"', '\\"') + '"'
        fields = {"uid": "0", "gid": "0", "atime": f"@{EPOCH}", "mtime": f"@{EPOCH}"}
        fields["ctime"] = f"@{EPOCH}"  # host ctime: cannot be set on the staging files
        for field, value in fields.items():
            cmds.append(f"sif {q} {field} {value}")
        try:
            names = os.listxattr(tree.root / rel if rel else tree.root, follow_symlinks=False)
        except OSError:
            names = []
        for name in sorted(names):
            cmds.append(f"ea_rm {q} {name}")
    cmdfile = workdir / f"debugfs-{image.name}.cmds"
    cmdfile.write_text("\n".join(cmds) + "\n")
    proc = _run(["debugfs", "-w", "-f", cmdfile, image])
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("debugfs ")]
    if errors:
        raise CommandError(["debugfs", "-w", "-f", str(cmdfile), str(image)], 0, "\n".join(errors))


def _make_fat16(
    image: Path,
    size: int,
    label: str,
    seed: int,
    hidden_sectors: int,
    files: Mapping[str, bytes],
    workdir: Path,
) -> None:
    """Build a FAT16 filesystem of size bytes in the file image holding files."""
    if image.exists():
        image.unlink()
    _new_sparse(image, size)
    vol_id = f"{_fixed_u32(seed, 'fat', label):08x}"
    # --invariant first: it also sets the volume id, and a later -i overrides it
    argv: list[str | os.PathLike[str]] = ["mkfs.fat", "--invariant", "-F", "16", "-S", "512"]
    argv += ["-h", str(hidden_sectors), "-n", label, "-i", vol_id, image]
    _run(argv)
    dirs = sorted({str(Path(rel).parent) for rel in files} - {"."})
    needed: set[str] = set()
    for d in dirs:
        parts = Path(d).parts
        needed.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    for d in sorted(needed):
        _run(["mmd", "-i", image, f"::/{d}"])
    src = workdir / "fat-src"
    src.mkdir(exist_ok=True)
    for rel, data in sorted(files.items()):
        host = src / Path(rel).name
        host.write_bytes(data)
        os.utime(host, (EPOCH, EPOCH))
        _run(["mcopy", "-o", "-i", image, host, f"::/{rel}"])
        host.unlink()
    _run(["fsck.fat", "-n", image])


# --------------------------------------------------------------------------- resinOS image

_INNER_GRUB_CFG = """\
default=boot
timeout=3

menuentry 'resinOS' --id boot {
  search --no-floppy --set=root --label resin-boot
  linux /bzImage root=LABEL=resin-rootA rootwait
}
"""


def _os_release(inner_name: str) -> bytes:
    if inner_name.startswith("balena-"):
        name, ident, version = "balenaOS", "balena-os", "2.80.3+rev1"
    else:
        name, ident, version = "Resin OS", "resin-os", "2.12.7+rev1"
    return (
        f'ID="{ident}"\nNAME="{name}"\nVERSION="{version}"\nVERSION_ID="{version}"\n'
        f'PRETTY_NAME="{name} {version}"\nMACHINE="genericx86-64"\nVARIANT="Production"\n'
        f'VARIANT_ID="prod"\nSLUG="intel-nuc"\n'
    ).encode()


def _resinos_rootfs(tree: _Tree, seed: int) -> None:
    """About 12 MiB: incompressible binaries and compressible text in /usr and /etc."""
    binaries = {
        "usr/bin/balena": 3 * MiB,
        "usr/bin/NetworkManager": 1536 * KiB,
        "usr/bin/openvpn": 640 * KiB,
        "usr/bin/busybox": 512 * KiB,
        "usr/lib/libc.so.6": 1280 * KiB,
        "usr/lib/libsystemd-shared.so": 1280 * KiB,
    }
    texts = {
        "usr/lib/udev/hwdb.txt": 2 * MiB,
        "usr/lib/modules/modules.alias": 1536 * KiB,
        "etc/ssl/certs/ca-certificates.crt": 256 * KiB,
        "etc/services": 128 * KiB,
    }
    for rel, size in binaries.items():
        tree.file(
            rel, _random_bytes(size, seed, "resinos", rel), 0o755 if "/bin/" in rel else 0o644
        )
    for rel, size in texts.items():
        tree.file(rel, _text_bytes(size, seed, "resinos", rel))
    tree.file("etc/os-release", _os_release(INNER_NAME))
    tree.file("etc/hostname", b"resin\n")
    tree.file("etc/fstab", b"/dev/root / auto defaults 1 1\n")
    resin_vars = b"#!/bin/sh\n# synthetic stand-in\nCONFIG_PATH=/mnt/boot/config.json\n"
    tree.file("usr/bin/resin-vars", resin_vars, 0o755)


def build_resinos_image(path: Path, seed: int = 1) -> None:
    """Write a small resinOS-shaped disk image (sparse, about 232 MiB apparent) to path.

    msdos table, 4 MiB aligned, the first 4 MiB holding pseudo-random boot code and a
    core.img stand-in; partitions resin-boot (FAT16), resin-rootA, resin-rootB, extended,
    resin-state and resin-data (ext4). The same seed gives byte-identical output.
    """
    path = Path(path)
    parts = _msdos_layout(
        [
            (_RESIN_BOOT_SIZE, _TYPE_FAT16_LBA, True),
            (_RESIN_ROOT_SIZE, _TYPE_LINUX, False),
            (_RESIN_ROOT_SIZE, _TYPE_LINUX, False),
        ],
        [_RESIN_STATE_SIZE, _RESIN_DATA_SIZE],
    )
    by_number = {p.number: p for p in parts}
    total = parts[-1].end * SECTOR
    with tempfile.TemporaryDirectory(prefix="resinos-") as tmp:
        work = Path(tmp)
        _new_sparse(path, total)
        _write_table(path, parts, _fixed_u32(seed, "resinos", "label-id"))
        with open(path, "r+b") as f:  # after sfdisk, touching only bytes 0..439 and 512..
            f.write(_random_bytes(_BOOT_CODE_LEN, seed, "resinos", "boot.img"))
            f.seek(SECTOR)
            f.write(_random_bytes(_CORE_IMG_LEN, seed, "resinos", "core.img"))

        boot_files = {
            "config.json": _json({"deviceType": "intel-nuc", "persistentLogging": False}),
            "grub.cfg": _INNER_GRUB_CFG.encode(),
            "EFI/BOOT/grub.cfg": _INNER_GRUB_CFG.encode(),
            "bzImage": _random_bytes(1 * MiB, seed, "resinos", "bzImage"),
        }
        p1 = by_number[1]
        _make_fat16(work / "p1", p1.nbytes, "resin-boot", seed, p1.start, boot_files, work)
        _place(work / "p1", path, p1.offset, p1.nbytes)

        root_a = _Tree(work / "rootA")
        _resinos_rootfs(root_a, seed)
        data = _Tree(work / "data")
        data.file("README", b"synthetic resin-data partition\n")
        data.file("docker/.keep", b"")
        ext4s = [
            (2, "resin-rootA", root_a),
            (3, "resin-rootB", None),
            (5, "resin-state", None),
            (6, "resin-data", data),
        ]
        for number, label, tree in ext4s:
            part = by_number[number]
            img = work / f"p{number}"
            _make_ext4(img, part.nbytes, label, seed, tree, work)
            _place(img, path, part.offset, part.nbytes)
            img.unlink()


# --------------------------------------------------------------------------- flasher image


@dataclasses.dataclass(frozen=True)
class FlasherSpec:
    """What the synthetic flasher looks like; the defaults match an older intel-nuc flasher."""

    inner_name: str = INNER_NAME  # e.g. "balena-image-genericx86-64.balenaos-img" (2.72+)
    with_zstd: bool = True  # /usr/bin/zstd (a copy of the host's) in flash-rootA
    with_inner_image: bool = True  # False: /opt holds no image (error case)
    with_rootA: bool = True  # False: partition 2 holds zeros, no flash-rootA (error case)
    kernel_name: str = "vmlinuz"  # or "bzImage"
    newer_grub_cfg: bool = False  # True: `search --label flash-rootA`, /boot/<kernel>, `flasher`
    seed: int = 1


def _flasher_grub_cfg(spec: FlasherSpec) -> str:
    if spec.newer_grub_cfg:
        body = (
            "  search --no-floppy --set=root --label flash-rootA\n"
            f"  linux /boot/{spec.kernel_name} root=LABEL=flash-rootA flasher\n"
        )
    else:
        body = f"  linux /{spec.kernel_name} root=LABEL=flash-rootA rootwait\n"
    return f"default=flash\ntimeout=3\n\nmenuentry 'flash' --id flash {{\n{body}}}\n"


_INIT_FLASHER = r"""#!/bin/bash
# Synthetic stand-in for balena's resin-init-flasher (tests only).
set -e
. /etc/resin-init-flasher.conf

internal_dev=""
root_dev=$(findmnt -n -o SOURCE / || true)
for dev in $INTERNAL_DEVICE_KERNEL; do
    if [ -b "/dev/$dev" ] && [ "${root_dev#/dev/$dev}" = "$root_dev" ]; then
        internal_dev="/dev/$dev"
        break
    fi
done
[ -n "$internal_dev" ] || { echo "resin-init-flasher: no internal device" >&2; exit 1; }

dd if="/opt/$RESIN_IMAGE" of="$internal_dev" bs=4M
partprobe "$internal_dev"
udevadm settle
mkdir -p /mnt/flash-boot /mnt/resin-boot
mount /dev/disk/by-label/flash-boot /mnt/flash-boot
mount /dev/disk/by-label/resin-boot /mnt/resin-boot
cp /mnt/flash-boot/config.json /mnt/resin-boot/config.json
cp "/mnt/flash-boot/$INTERNAL_DEVICE_BOOTLOADER_CONFIG" \
   "/mnt/resin-boot/$INTERNAL_DEVICE_BOOTLOADER_CONFIG_PATH"
sync
shutdown -h now
"""


def _flasher_conf(spec: FlasherSpec) -> bytes:
    return (
        'INTERNAL_DEVICE_KERNEL="nvme0n1 sda sdb mmcblk0 mmcblk1"\n'
        "INTERNAL_DEVICE_BOOTLOADER_CONFIG=grub.cfg_internal\n"
        "INTERNAL_DEVICE_BOOTLOADER_CONFIG_PATH=/EFI/BOOT/grub.cfg\n"
        f"RESIN_IMAGE={spec.inner_name}\n"
    ).encode()


def _host_tool(name: str) -> Path:
    found = shutil.which(name)
    if found is None:
        raise SyntheticImageError(f"no {name} binary on this host")
    return Path(found).resolve()


def _host_zstd() -> Path:
    for candidate in (Path("/usr/bin/zstd"), shutil.which("zstd")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise SyntheticImageError("no zstd binary on this host (FlasherSpec(with_zstd=True))")


def build_flasher_image(path: Path, spec: FlasherSpec = FlasherSpec()) -> None:
    """Write an intel-nuc-flasher-shaped disk image to path (sparse).

    Partitions as in REFERENCE.md: flash-boot (FAT16, boot+lba), flash-rootA (ext4 with
    the inner resinOS image in /opt, stored sparse), flash-rootB (tiny ext4), extended
    (lba), flash-state and flash-data (unformatted). The same spec gives byte-identical
    output.
    """
    path = Path(path)
    seed = spec.seed
    kernel = _random_bytes(_FLASH_KERNEL_SIZE, seed, "flasher", "kernel")
    with tempfile.TemporaryDirectory(prefix="flasher-") as tmp:
        work = Path(tmp)

        # flash-rootA contents, staged first: its size decides the layout
        root_a = _Tree(work / "rootA")
        root_a.dir("opt")
        if spec.with_inner_image:
            build_resinos_image(root_a.path(f"opt/{spec.inner_name}"), seed=seed)
        root_a.file("usr/bin/resin-init-flasher", _INIT_FLASHER.encode(), 0o755)
        root_a.file("etc/resin-init-flasher.conf", _flasher_conf(spec))
        root_a.file("etc/os-release", _os_release(spec.inner_name))
        sh_stand_in = b"\x7fELF\x02\x01\x01\x00" + _random_bytes(16 * KiB, seed, "flasher", "sh")
        root_a.file("bin/sh", sh_stand_in, 0o755)
        # every flasher has gzip (GNU or busybox); stage 2 decompresses with it
        root_a.file("bin/gzip", _host_tool("gzip").read_bytes(), 0o755)
        if spec.with_zstd:
            root_a.file("usr/bin/zstd", _host_zstd().read_bytes(), 0o755)
        if spec.newer_grub_cfg:  # GRUB's `search --label flash-rootA` finds the kernel here
            root_a.file(f"boot/{spec.kernel_name}", kernel)
        raw = root_a.apparent_size()
        root_a_size = _round_up(int(raw * _ROOTA_FREE_FACTOR) + _ROOTA_OVERHEAD, ALIGN)

        parts = _msdos_layout(
            [
                (_FLASH_BOOT_SIZE, _TYPE_FAT16_LBA, True),
                (root_a_size, _TYPE_LINUX, False),
                (_FLASH_ROOTB_SIZE, _TYPE_LINUX, False),
            ],
            [_FLASH_STATE_SIZE, _FLASH_DATA_SIZE],
        )
        by_number = {p.number: p for p in parts}
        _new_sparse(path, parts[-1].end * SECTOR)
        _write_table(path, parts, _fixed_u32(seed, "flasher", "label-id"))

        grub_cfg = _flasher_grub_cfg(spec).encode()
        kernel_path = f"boot/{spec.kernel_name}" if spec.newer_grub_cfg else spec.kernel_name
        boot_files = {
            "config.json": _json({"deviceType": "intel-nuc", "applicationName": "synthetic"}),
            "resin-image-flasher": b"",
            kernel_path: kernel,
            "grub.cfg": grub_cfg,
            "EFI/BOOT/grub.cfg": grub_cfg,
            "grub.cfg_internal": _INNER_GRUB_CFG.encode(),
            "splash/resin-logo.png": _png(seed, "flasher", "splash"),
        }
        p1 = by_number[1]
        _make_fat16(work / "p1", p1.nbytes, "flash-boot", seed, p1.start, boot_files, work)
        _place(work / "p1", path, p1.offset, p1.nbytes)
        (work / "p1").unlink()

        if spec.with_rootA:
            p2 = by_number[2]
            _make_ext4(work / "p2", p2.nbytes, "flash-rootA", seed, root_a, work)
            _place(work / "p2", path, p2.offset, p2.nbytes)
            (work / "p2").unlink()

        p3 = by_number[3]
        _make_ext4(work / "p3", p3.nbytes, "flash-rootB", seed, None, work)
        _place(work / "p3", path, p3.offset, p3.nbytes)
        # 5 flash-state and 6 flash-data stay unformatted (zeros)


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where cached synthetic images live (created): $RESIN_MIGRATE_CACHE, else
    /var/cache/resin-migrate when writable (root), else ~/.cache/resin-migrate;
    always in the subfolder "synthetic"."""
    env = os.environ.get("RESIN_MIGRATE_CACHE")
    if env:
        base = Path(env)
    else:
        system = Path("/var/cache/resin-migrate")
        if os.access(system if system.exists() else system.parent, os.W_OK):
            base = system
        else:
            base = Path.home() / ".cache" / "resin-migrate"
    out = base / "synthetic"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _cache_key(spec: FlasherSpec) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(repr(spec).encode())
    return h.hexdigest()[:20]


def cached_flasher(spec: FlasherSpec = FlasherSpec()) -> Path:
    """Path of a flasher built from spec, built once into cache_dir() and reused.

    The key covers this file's source and the spec. The build goes to a temporary name
    in the same directory, renamed into place at the end, so concurrent callers are safe
    (the last rename wins with identical bytes).
    """
    directory = cache_dir()
    final = directory / f"flasher-{_cache_key(spec)}.img"
    if final.exists():
        return final
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        build_flasher_image(tmp, spec)
        os.chmod(tmp, 0o644)  # mkstemp made it 0600; the cache may be shared
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a synthetic intel-nuc flasher (or resinOS) image."
    )
    parser.add_argument("out_path", metavar="OUT_PATH", type=Path)
    parser.add_argument(
        "--resinos", action="store_true", help="write the inner resinOS image instead"
    )
    parser.add_argument("--inner-name", default=INNER_NAME)
    parser.add_argument("--kernel-name", default="vmlinuz")
    parser.add_argument("--newer-grub-cfg", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        if args.resinos:
            build_resinos_image(args.out_path, seed=args.seed)
        else:
            spec = FlasherSpec(
                inner_name=args.inner_name,
                kernel_name=args.kernel_name,
                newer_grub_cfg=args.newer_grub_cfg,
                seed=args.seed,
            )
            build_flasher_image(args.out_path, spec)
    except SyntheticImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(args.out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
