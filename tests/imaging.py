"""What every test image builder shares: one command runner, one cache-or-build helper, one
QEMU command line and its serial-port watcher, and the pieces disk images are made of.

Used by ``tests.synthetic`` (the rootless flasher matrix), ``tests.rig.*`` (the legacy
device, the tools VM, the bootable flasher and resinOS stand-ins) and the benchmark images.

- ``run(argv)``: every external command, in a minimal fixed environment (C locale, UTC,
  sbin on PATH); a failure raises ``CommandError`` naming the command, its exit code and
  stderr. Image builders pass ``env=FIXED_CLOCK`` so that e2fsprogs and mtools stamp the
  same times on every build.
- ``cached(name, build)``: a file or directory in ``cache_dir()`` built once by
  ``build(tmp)`` next to its final name and renamed into place; the name carries the key
  (``key(...)`` of the sources and specs it was made from).
- ``qemu_argv(...)`` and ``boot(...)``: QEMU in software emulation booting disks by BIOS or a
  kernel directly, with its serial ports on files that are read live.
- The image pieces: deterministic content (``fixed_uuid``, ``random_bytes``...), msdos
  layouts written with sfdisk, a staging ``Tree`` for ``mkfs.ext4 -d``, ``make_ext4``,
  ``make_fat16`` and ``place`` (a sparse copy of a filesystem to its offset).

Standard library only; nothing here needs root except what a caller builds with it.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import random
import re
import shlex
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

#: Every timestamp in the synthetic images: 2020-01-01T00:00:00Z.
EPOCH = 1_577_836_800
SECTOR = 512
KiB = 1 << 10
MiB = 1 << 20
#: Partition alignment of the real images; also the reserved area before partition 1.
ALIGN = 4 * MiB

#: The environment that makes e2fsprogs and mtools write the same bytes on every build.
FIXED_CLOCK = {
    "SOURCE_DATE_EPOCH": str(EPOCH),  # mtools
    "E2FSPROGS_FAKE_TIME": str(EPOCH),  # e2fsprogs
    "MTOOLS_SKIP_CHECK": "1",
}


# --------------------------------------------------------------------------- errors


class ImageError(Exception):
    """Base of every error raised while building or booting a test image."""


class CommandError(ImageError):
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


def base_env() -> dict[str, str]:
    """The minimal environment commands run with (sbin on PATH, C locale, no prompts)."""
    dirs = os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
    extra = [d for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin") if d not in dirs]
    return {
        "PATH": os.pathsep.join([*dirs, *extra]),
        "LC_ALL": "C",
        "TZ": "UTC",
        "HOME": os.environ.get("HOME", "/root"),
        "DEBIAN_FRONTEND": "noninteractive",
    }


def run(
    argv: Sequence[str | os.PathLike[str] | int],
    *,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    ok_codes: Iterable[int] = (0,),
    timeout: float | None = 600,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one command in base_env() (plus env); raise CommandError on an exit code not in
    ok_codes, on a timeout, or when it cannot start."""
    args = [os.fspath(a) if not isinstance(a, int) else str(a) for a in argv]
    full_env = base_env()
    if env:
        full_env.update(env)
    log.debug("run: %s", shlex.join(args))
    try:
        proc = subprocess.run(args, input=stdin, capture_output=True, text=True,
                              errors="replace", env=full_env, check=False, timeout=timeout,
                              cwd=cwd)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CommandError(args, -1, str(exc)) from exc
    if proc.returncode not in tuple(ok_codes):
        raise CommandError(args, proc.returncode, proc.stderr or proc.stdout[-4000:])
    return proc


def debugfs(image: Path | str, commands: Sequence[str], *, write: bool = False,
            workdir: Path | None = None) -> str:
    """Run debugfs commands on image (a path, or "PATH?offset=N"); debugfs exits 0 when a
    command fails, so any stderr line but its banner raises CommandError."""
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs", dir=workdir,
                                     delete=False) as script:
        script.write("\n".join(commands) + "\n")
    try:
        argv = ["debugfs", *(["-w"] if write else []), "-f", script.name, os.fspath(image)]
        proc = run(argv, env=FIXED_CLOCK)
    finally:
        os.unlink(script.name)
    errors = [line for line in proc.stderr.splitlines()
              if line.strip() and not line.startswith("debugfs ")]
    if errors:
        raise CommandError(argv, 0, "\n".join(errors))
    return proc.stdout


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where cached test images live (created): $RESIN_MIGRATE_CACHE, else
    /var/cache/resin-migrate when writable (root), else ~/.cache/resin-migrate; always in
    the subfolder "synthetic"."""
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


def key(*parts: object) -> str:
    """A cache key of parts: paths stand for their bytes (a module's source), anything else
    for its repr (a spec)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            digest.update(part.read_bytes())
        else:
            digest.update(repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def cached(name: str, build: Callable[[Path], None], *, directory: bool = False,
           folder: Path | None = None) -> Path:
    """folder/name (default folder: cache_dir()), made by build(tmp) the first time: tmp (a
    file, or a directory when directory=True) is created next to it and renamed into place
    when build returns, so a failed or concurrent build never leaves a half-made entry (the
    last rename wins, with the same bytes)."""
    final = (folder or cache_dir()) / name
    if final.exists():
        return final
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    else:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp",
                                        dir=final.parent)
        os.close(fd)
        tmp = Path(tmp_name)
    started = time.monotonic()
    try:
        build(tmp)
        os.chmod(tmp, 0o755 if directory else 0o644)  # mkstemp/mkdtemp: owner only
        if directory:
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
        else:
            os.replace(tmp, final)
        log.info("%s built in %.0f s", final.name, time.monotonic() - started)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return final


# --------------------------------------------------------------------------- content


def digest(*parts: object) -> bytes:
    text = ":".join(str(p) for p in ("resin-migrate-synthetic", *parts))
    return hashlib.sha256(text.encode()).digest()


def rng(*parts: object) -> random.Random:
    """A pseudo-random generator fixed by its name (independent of PYTHONHASHSEED)."""
    return random.Random(digest(*parts))


def fixed_uuid(*parts: object) -> str:
    return str(uuid.UUID(bytes=digest(*parts)[:16], version=4))


def fixed_u32(*parts: object) -> int:
    return int.from_bytes(digest(*parts)[:4], "big") | 1  # never 0


def random_bytes(size: int, *parts: object) -> bytes:
    """Incompressible content."""
    return rng(*parts).randbytes(size)


_WORDS = (
    "the", "of", "and", "to", "in", "is", "for", "on", "with", "as", "by", "at", "from",
    "device", "kernel", "resin", "balena", "os", "image", "boot", "root", "state", "data",
    "partition", "flash", "grub", "linux", "module", "driver", "firmware", "network",
    "manager", "service", "system", "config", "json", "label", "disk", "sector", "block",
    "write", "read", "mount", "overlay", "supervisor", "container", "engine", "update",
    "rollback", "migrate", "swap", "alias", "pci", "usb", "ata", "nvme", "mmc", "ext4", "vfat",
    "intel", "nuc", "generic", "x86", "64", "enable", "start", "stop",
)


def text_bytes(size: int, *parts: object) -> bytes:
    """Compressible, text-like content (lines of words)."""
    words = rng(*parts).choices(_WORDS, k=size // 5 + 16)
    lines = (" ".join(words[i : i + 12]) for i in range(0, len(words), 12))
    return "\n".join(lines).encode()[: size - 1] + b"\n"


def png(*parts: object) -> bytes:
    """A small, valid 16x16 RGB PNG."""
    generator = rng(*parts)
    width = height = 16
    raw = b"".join(b"\x00" + generator.randbytes(width * 3) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


# --------------------------------------------------------------------------- layout

TYPE_FAT16_LBA = "e"
TYPE_LINUX = "83"
TYPE_EXTENDED_LBA = "f"


@dataclasses.dataclass(frozen=True)
class Part:
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


def msdos_layout(primaries: Sequence[tuple[int, str, bool]], logicals: Sequence[int]
                 ) -> list[Part]:
    """Partitions 1..3 primary (bytes, type, bootable), 4 extended (lba), 5.. logical; all
    4 MiB aligned, the first 4 MiB reserved. Each logical partition starts 4 MiB after the
    previous end (its EBR lives in that gap), as in the real images."""
    align = ALIGN // SECTOR
    parts: list[Part] = []
    cursor = align
    for number, (nbytes, ptype, bootable) in enumerate(primaries, start=1):
        if nbytes % ALIGN:
            raise ImageError(f"partition {number}: {nbytes} bytes is not 4 MiB aligned")
        parts.append(Part(number, cursor, nbytes // SECTOR, ptype, bootable))
        cursor += nbytes // SECTOR
    ext_start = cursor
    logical_parts: list[Part] = []
    for number, nbytes in enumerate(logicals, start=5):
        if nbytes % ALIGN:
            raise ImageError(f"partition {number}: {nbytes} bytes is not 4 MiB aligned")
        cursor += align
        logical_parts.append(Part(number, cursor, nbytes // SECTOR, TYPE_LINUX))
        cursor += nbytes // SECTOR
    parts.append(Part(len(primaries) + 1, ext_start, cursor - ext_start, TYPE_EXTENDED_LBA))
    return parts + logical_parts


def write_table(image: Path, parts: Sequence[Part], label_id: int) -> None:
    """An msdos table with the disk identifier label_id, written by sfdisk (rootless)."""
    lines = ["label: dos", f"label-id: 0x{label_id:08x}", "unit: sectors", ""]
    for p in parts:
        lines.append(f"start={p.start}, size={p.size}, type={p.type}"
                     + (", bootable" if p.bootable else ""))
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", image],
        stdin="\n".join(lines) + "\n")


def new_sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def data_ranges(fd: int, size: int) -> Iterable[tuple[int, int]]:
    """(start, end) byte ranges of fd that may hold data (holes skipped where supported)."""
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


def place(src: Path, dst: Path, offset: int, length: int) -> None:
    """Copy src into dst at offset, writing only non-zero 64 KiB blocks (dst is zeroed)."""
    size = src.stat().st_size
    if size > length:
        raise ImageError(f"{src}: {size} bytes do not fit in {length} bytes at {offset} of {dst}")
    block = 64 * KiB
    zero = bytes(block)
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        for start, end in data_ranges(fin.fileno(), size):
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


def write_at(image: Path, offset: int, data: bytes) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(data)


# --------------------------------------------------------------------------- trees


class Tree:
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

    def copy(self, rel: str, src: Path, mode: int | None = None) -> None:
        dest = self.path(rel, mode if mode is not None else src.stat().st_mode & 0o777)
        shutil.copyfile(src, dest)

    def dir(self, rel: str) -> None:
        self.path(rel).mkdir(exist_ok=True)

    def symlink(self, rel: str, target: str) -> None:
        link = self.root / rel.strip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(target, link)

    def exists(self, rel: str) -> bool:
        p = self.root / rel.strip("/")
        return p.is_symlink() or p.exists()

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
            is_dir = os.path.isdir(self.root / rel) and not os.path.islink(self.root / rel)
            total += 4 * KiB if is_dir else round_up(st.st_size, 4 * KiB)
        return total

    def seal(self) -> None:
        """Fix modes and mtimes/atimes of everything (ctime and owner: see make_ext4)."""
        for rel in reversed(self.entries()):  # children before parents
            p = self.root / rel
            if p.is_symlink():
                continue
            os.chmod(p, 0o755 if p.is_dir() else self.modes.get(rel, 0o644))
            os.utime(p, (EPOCH, EPOCH))
        os.chmod(self.root, 0o755)
        os.utime(self.root, (EPOCH, EPOCH))


# --------------------------------------------------------------------------- filesystems

# Pinned mkfs.ext4 defaults, so the host's /etc/mke2fs.conf does not change the result.
MKE2FS_CONF = """\
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


def mkfs_env(workdir: Path) -> dict[str, str]:
    conf = workdir / "mke2fs.conf"
    if not conf.exists():
        conf.write_text(MKE2FS_CONF)
    return {**FIXED_CLOCK, "MKE2FS_CONFIG": str(conf)}


def make_ext4(image: Path, size: int, label: str, seed: object, tree: Tree | None,
              workdir: Path) -> None:
    """An ext4 filesystem of size bytes in the file image, from tree if given; UUID and hash
    seed fixed by (seed, label), every inode root-owned with pinned times."""
    fs_uuid = fixed_uuid(seed, "ext4", label)
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
    run(argv, env=mkfs_env(workdir))
    if tree is not None:
        _fix_inodes(image, tree, workdir)
    run(["e2fsck", "-fn", image], env=FIXED_CLOCK)


def _fix_inodes(image: Path, tree: Tree, workdir: Path) -> None:
    """mkfs.ext4 -d copies the host uid/gid, ctime and xattrs: set them to fixed values."""
    commands = []
    for rel in ["", *tree.entries()]:
        target = '"' + ("/" + rel).replace('"', '\\"') + '"'
        for field, value in (("uid", "0"), ("gid", "0"), ("atime", f"@{EPOCH}"),
                             ("mtime", f"@{EPOCH}"), ("ctime", f"@{EPOCH}")):
            commands.append(f"sif {target} {field} {value}")
        try:
            names = os.listxattr(tree.root / rel if rel else tree.root, follow_symlinks=False)
        except OSError:
            names = []
        commands.extend(f"ea_rm {target} {name}" for name in sorted(names))
    debugfs(image, commands, write=True, workdir=workdir)


def make_fat16(image: Path, size: int, label: str, seed: object, hidden_sectors: int,
               files: Mapping[str, Path | bytes], workdir: Path) -> None:
    """A FAT16 filesystem of size bytes in the file image holding files (relative path ->
    host file or bytes); volume id fixed by (seed, label), times fixed, one mcopy per
    directory."""
    if image.exists():
        image.unlink()
    new_sparse(image, size)
    vol_id = f"{fixed_u32(seed, 'fat', label):08x}"
    # --invariant first: it also sets the volume id, and a later -i overrides it
    run(["mkfs.fat", "--invariant", "-F", "16", "-S", "512", "-h", str(hidden_sectors),
         "-n", label, "-i", vol_id, image], env=FIXED_CLOCK)
    stage = workdir / f"fat-{label}"
    if stage.exists():
        shutil.rmtree(stage)
    by_dir: dict[str, list[str]] = {}
    for rel, src in sorted(files.items()):
        dest = stage / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            dest.write_bytes(src)
        else:
            shutil.copyfile(src, dest)
        os.utime(dest, (EPOCH, EPOCH))
        by_dir.setdefault(os.path.dirname(rel), []).append(rel)
    dirs: set[str] = set()
    for parent in by_dir:
        parts = Path(parent).parts
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    for d in sorted(dirs):
        run(["mmd", "-i", image, f"::/{d}"], env=FIXED_CLOCK)
    for parent, rels in sorted(by_dir.items()):
        target = f"::/{parent}/" if parent else "::/"
        run(["mcopy", "-m", "-i", image, *(stage / r for r in sorted(rels)), target],
            env=FIXED_CLOCK)
    shutil.rmtree(stage)
    run(["fsck.fat", "-n", image], env=FIXED_CLOCK)


def grub_boot_code(workdir: Path, prefix: str = "(hd0,msdos1)/grub",
                   modules: Sequence[str] = ("biosdisk", "part_msdos", "fat", "ext2")
                   ) -> tuple[bytes, bytes]:
    """(boot.img, core.img) of this host's GRUB for i386-pc (grub-pc-bin): the MBR boot code
    and a core.img made by grub-mkimage, as an image carries them at byte 0 and sector 1."""
    boot = Path("/usr/lib/grub/i386-pc/boot.img")
    if not boot.is_file() or shutil.which("grub-mkimage", path=base_env()["PATH"]) is None:
        raise ImageError("no GRUB for i386-pc on this host (./setup.sh installs grub-pc-bin)")
    core = workdir / "core.img"
    run(["grub-mkimage", "-O", "i386-pc", "-p", prefix, "-o", core, *modules])
    return boot.read_bytes(), core.read_bytes()


# --------------------------------------------------------------------------- QEMU

QEMU = "qemu-system-x86_64"
_KILL_GRACE = 5.0
_POLL = 0.05


@dataclasses.dataclass(frozen=True)
class Drive:
    """A raw disk image attached to the VM: on the IDE controller (at most four, the first
    /dev/sda, serial resin-disk<i>) or as virtio-blk; snapshot: writes go to a throwaway
    overlay."""

    path: Path
    bus: str = "ide"
    snapshot: bool = False


def _opt(value: str | os.PathLike[str]) -> str:
    """A value inside a QEMU -opt list: commas doubled."""
    return os.fspath(value).replace(",", ",,")


def qemu_argv(
    drives: Sequence[Drive],
    serials: Sequence[Path],
    *,
    kernel: Path | None = None,
    initrd: Path | None = None,
    append: str | None = None,
    fw_cfg: Mapping[str, Path | str] | None = None,
    shares: Mapping[str, Path] | None = None,
    reboot: bool = True,
    memory_mib: int = 1024,
    ssh_port: int | None = None,
) -> list[str]:
    """The one QEMU command line of the tests: a PC in software emulation (KVM here runs no
    stock kernel: -accel tcg,thread=multi -cpu qemu64 -smp 2), no network (with ssh_port:
    user networking, the guest's port 22 forwarded from 127.0.0.1:ssh_port), no display, a
    virtio RNG, each serial port written to a file, the drives in order (the first IDE one
    boots by BIOS, unless kernel is given: direct kernel boot), fw_cfg entries (a Path: its
    file; a str: the string), read-only 9p shares. reboot=False: a guest reboot ends QEMU."""
    argv = [
        QEMU, "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", "pc", "-accel", "tcg,thread=multi", "-cpu", "qemu64", "-smp", "2",
        "-m", str(memory_mib), "-rtc", "base=utc",
        "-nic", "none" if ssh_port is None else
        f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
    ]
    if not reboot:
        argv.append("-no-reboot")
    for index, path in enumerate(serials):
        argv += ["-chardev", f"file,id=ttyS{index},path={_opt(path)}",
                 "-serial", f"chardev:ttyS{index}"]
    argv += ["-device", "virtio-rng-pci"]
    if kernel is not None:
        argv += ["-kernel", str(kernel)]
        if initrd is not None:
            argv += ["-initrd", str(initrd)]
        if append is not None:
            argv += ["-append", append]
    ide = 0
    for index, drive in enumerate(drives):
        spec = f"if=none,id=disk{index},file={_opt(drive.path)},format=raw,cache=unsafe"
        argv += ["-drive", spec + (",snapshot=on" if drive.snapshot else "")]
        if drive.bus == "virtio":
            argv += ["-device", f"virtio-blk-pci,drive=disk{index}"]
            continue
        boot_index = ",bootindex=0" if ide == 0 and kernel is None else ""
        argv += ["-device", f"ide-hd,drive=disk{index},bus=ide.{ide // 2},unit={ide % 2},"
                            f"serial=resin-disk{ide}{boot_index}"]
        ide += 1
    if ide > 4:
        raise ValueError(f"at most 4 IDE disks (PIIX), got {ide}")
    for name, value in (fw_cfg or {}).items():
        source = f"file={_opt(value)}" if isinstance(value, Path) else f"string={_opt(value)}"
        argv += ["-fw_cfg", f"name={name},{source}"]
    for tag, directory in (shares or {}).items():
        argv += ["-virtfs",
                 f"local,path={_opt(directory)},mount_tag={tag},security_model=none,readonly=on"]
    return argv


@dataclasses.dataclass
class BootResult:
    serials: list[list[tuple[float, str]]]  # per port: (seconds since QEMU started, line)
    reason: str  # "poweroff" (QEMU exited by itself), "timeout", "marker" or "cut"
    seconds: float  # wall time from QEMU's start to the end of the run
    returncode: int | None  # QEMU's, when it exited by itself

    @property
    def serial0(self) -> list[tuple[float, str]]:
        return self.serials[0] if self.serials else []

    @property
    def serial1(self) -> list[tuple[float, str]]:
        return self.serials[1] if len(self.serials) > 1 else []

    @property
    def serial0_text(self) -> str:
        return "".join(line + "\n" for _, line in self.serial0)

    @property
    def serial1_text(self) -> str:
        return "".join(line + "\n" for _, line in self.serial1)

    def lines(self, needle: str, port: int | None = None) -> list[tuple[float, str]]:
        """The lines containing needle, on port 0, 1 or (None) every port, in time order."""
        ports = self.serials if port is None else [self.serials[port]]
        found = [item for lines in ports for item in lines if needle in item[1]]
        return sorted(found, key=lambda item: item[0])

    def first(self, needle: str, port: int | None = None) -> float | None:
        """When the first line containing needle arrived (seconds), None if none did."""
        return self.first_after(needle, -1.0, port)

    def first_after(self, needle: str, since: float, port: int | None = None,
                    nth: int = 1) -> float | None:
        """When the nth line containing needle after since arrived, None if none did."""
        found = [when for when, _ in self.lines(needle, port) if when > since]
        return found[nth - 1] if len(found) >= nth else None


class BootError(ImageError):
    """QEMU could not run (refused to start, failed). ``result`` holds the logs."""

    def __init__(self, message: str, result: BootResult) -> None:
        self.result = result
        tail = "\n".join(line for _, line in result.serial0[-60:])
        super().__init__(f"{message}\n--- serial0 (tail) ---\n{tail}")


class _Lines:
    """Complete lines of a growing file, each stamped when it was read."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._pending = b""
        self.lines: list[tuple[float, str]] = []

    def poll(self, now: float) -> list[str]:
        data = self._file.read()
        if not data:
            return []
        self._pending += data
        *complete, self._pending = self._pending.split(b"\n")
        new = [_decode(raw) for raw in complete]
        self.lines += [(now, line) for line in new]
        return new

    def partial(self) -> str:
        return _decode(self._pending)

    def flush(self, now: float) -> None:
        if self._pending:
            self.lines.append((now, _decode(self._pending)))
            self._pending = b""

    def close(self) -> None:
        self._file.close()


#: terminal control sequences (GRUB's menu, systemd's coloured status): CSI and charset
#: selection; dropped from the stamped lines (the raw logs keep them, see log_dir)
_ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>78])")


def _decode(raw: bytes) -> str:
    return _ESCAPES.sub("", raw.decode("utf-8", errors="replace")).strip("\r")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End QEMU (our own child): SIGTERM, then SIGKILL after a grace period."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=_KILL_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclasses.dataclass(frozen=True)
class Cut:
    """Where boot() cuts the power: at the nth line (on any port) containing marker, and
    once the guest has written `written` more bytes to its first disk since (QEMU's own
    count, QMP query-blockstats wr_bytes). QEMU is then killed (SIGKILL): nothing it held
    is flushed, the disk holds what the guest had handed over (cache=unsafe keeps nothing
    back), as after a power cut."""

    marker: str
    nth: int = 1
    written: int = 0


class _CutWatch:
    def __init__(self, cut: Cut, qmp_socket: Path) -> None:
        self.cut = cut
        self.socket = qmp_socket
        self.seen = 0
        self.base: int | None = None       # wr_bytes when the marker was seen
        self._monitor: object | None = None

    def line(self, text: str) -> None:
        if self.cut.marker in text:
            self.seen += 1

    def due(self) -> bool:
        if self.seen < self.cut.nth:
            return False
        if not self.cut.written:
            return True
        written = self._written()
        if self.base is None:
            self.base = written
        return written - self.base >= self.cut.written

    def _written(self) -> int:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        if self._monitor is None:
            monitor = QEMUMonitorProtocol(str(self.socket))
            monitor.connect()
            self._monitor = monitor
        stats = self._monitor.cmd("query-blockstats")  # type: ignore[attr-defined]
        first = next(entry for entry in stats if entry.get("device") == "disk0")
        return int(first["stats"]["wr_bytes"])

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.close()  # type: ignore[attr-defined]
            self._monitor = None


def boot(
    drives: Sequence[Drive],
    *,
    ports: int = 2,
    timeout: float = 900,
    until: str | None = None,
    cut: Cut | None = None,
    log_dir: Path | None = None,
    on_line: Callable[[float, str], None] | None = None,
    **qemu: object,
) -> BootResult:
    """Run QEMU (qemu_argv(drives, ..., **qemu)) and read its serial ports live until it
    exits by itself ("poweroff"), a line on any port contains until ("marker"; also a
    prompt without a newline, or a line in the last output of a QEMU that exited), or
    timeout seconds pass ("timeout"), or at cut ("cut": killed, see Cut). QEMU is always
    ended before this returns. Each line
    is stamped when read, terminal control sequences and CRs removed. log_dir keeps
    serial<N>.log and qemu.log (default: a temporary directory, removed). on_line(seconds,
    line) sees each line as it arrives (for a live account of long runs). With "marker" or
    "timeout" the disks hold what the guest had handed to QEMU (cache=unsafe keeps nothing
    back; the guest's page cache is lost), as after a power cut.

    Raises BootError when QEMU exits with an error, ValueError for bad arguments."""
    for drive in drives:
        if not (Path(drive.path).is_file() or Path(drive.path).is_block_device()):
            raise ValueError(f"not a disk image or block device: {drive.path}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, not {timeout}")
    binary = shutil.which(QEMU, path=base_env()["PATH"])
    if binary is None:
        raise ImageError(f"no {QEMU} on this host (./setup.sh installs qemu-system-x86)")
    with tempfile.TemporaryDirectory(prefix="resin-boot-") as tmp_name:
        logs = Path(log_dir) if log_dir is not None else Path(tmp_name)
        logs.mkdir(parents=True, exist_ok=True)
        serial_paths = [logs / f"serial{index}.log" for index in range(ports)]
        for path in serial_paths:
            path.write_bytes(b"")  # opened for reading before QEMU starts
        argv = qemu_argv([dataclasses.replace(d, path=Path(d.path).resolve()) for d in drives],
                         serial_paths, **qemu)  # type: ignore[arg-type]
        argv[0] = binary
        watch_cut = None
        if cut is not None:
            qmp_socket = Path(tmp_name) / "qmp.sock"
            argv += ["-qmp", f"unix:{qmp_socket},server=on,wait=off"]
            watch_cut = _CutWatch(cut, qmp_socket)
        env = base_env()
        env["TMPDIR"] = tmp_name  # snapshot=on overlays go there
        log.debug("boot: %s", shlex.join(argv))
        readers = [_Lines(path) for path in serial_paths]
        started = time.monotonic()
        try:
            with open(logs / "qemu.log", "wb") as qemu_out:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qemu_out,
                                        stderr=subprocess.STDOUT, env=env)
                reason = "error"
                try:
                    reason = _watch(proc, readers, started, timeout, until, watch_cut,
                                    on_line)
                finally:
                    if reason == "cut":     # a power cut: no clean exit of QEMU
                        proc.kill()
                        proc.wait()
                    stop(proc)
                    if watch_cut is not None:
                        watch_cut.close()
            seconds = time.monotonic() - started
            for reader in readers:
                reader.flush(seconds)
        finally:
            for reader in readers:
                reader.close()
        exited = reason == "poweroff"
        result = BootResult(serials=[reader.lines for reader in readers], reason=reason,
                            seconds=seconds, returncode=proc.returncode if exited else None)
        if exited and proc.returncode != 0:
            message = (logs / "qemu.log").read_text(errors="replace").strip()
            raise BootError(f"{QEMU} exited with {proc.returncode}: {message}", result)
        log.info("boot of %s: %s after %.1f s", Path(drives[0].path).name, reason, seconds)
        return result


def _watch(proc: subprocess.Popen[bytes], readers: list[_Lines], started: float,
           timeout: float, until: str | None, cut: _CutWatch | None = None,
           on_line: Callable[[float, str], None] | None = None) -> str:
    def seen(now: float) -> bool:
        hit = False
        for reader in readers:
            for line in reader.poll(now):
                if on_line is not None:
                    on_line(now, line)
                hit = hit or (until is not None and until in line)
                if cut is not None:
                    cut.line(line)
        if not hit and until is not None:
            for reader in readers:
                if until in reader.partial():  # a prompt without a newline
                    reader.flush(now)
                    hit = True
        return hit

    while True:
        exited = proc.poll() is not None
        now = time.monotonic() - started
        if seen(now):
            return "marker"
        if cut is not None and not exited and cut.due():
            return "cut"
        if exited:  # the output read after the exit was complete: checked above
            return "poweroff"
        if now >= timeout:
            return "timeout"
        time.sleep(_POLL)
