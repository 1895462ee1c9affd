"""Legacy device disk images: a real Debian root filesystem and a swap partition, the
way Debian and Ubuntu installers lay them out, for the runtime's loop-device tests.

    spec = LegacySpec(placement=SwapPlacement.LOGICAL)
    image = copy_legacy_image(spec, tmp_path / "disk.img")   # sparse copy of the cache
    with attached(image) as dev, mounted_root(dev) as sysroot:
        # python3 resin-migrate.pyz stage1 --disk {dev.device} --sysroot {sysroot}
        ...

Layouts (msdos, disk identifier ``DISK_ID``), with ``Alignment.MIB`` (the default: 1 MiB,
as fdisk, parted and the installers align since about 2010):

- PRIMARY: p1 root ext4 (bootable), p2 swap (type 82); free space after p2 if any;
- LOGICAL (Ubuntu's default): p1 root ext4 (bootable), p2 extended (type 05) to the end
  of the disk, p5 swap (type 82) 1 MiB into p2;
- ``with_swap_partition=False``: p1 root ext4 (bootable) over the whole disk and a
  64 MiB swap file ``/swapfile`` (Ubuntu 17.04 and later: the refusal case).

``Alignment.CYLINDER`` is the same layout as fdisk and partman made it in DOS compatibility
mode (Ubuntu before about 2010, and many devices imaged from such installs): a geometry of
255 heads and 63 sectors a track, p1 at sector 63, every partition ending on a cylinder
boundary (16065 sectors; sizes rounded up to whole cylinders), the extended partition
starting on one and ending at the last whole cylinder of the disk, and the logical p5 63
sectors after its boot record (the extended partition's first sector). The gap before p1
is 62 sectors (31 KiB): GRUB's core.img must fit there (grub-install embeds it, the VM
rig checks; GRUB refuses blocklists without --force).

The root filesystem is ext4 labelled ``legacy-root`` (UUID ``ROOT_UUID``) holding the
rootfs of ``tests.rig.rootfs``; ``/etc/fstab`` names ``/`` by UUID and the swap as
``spec.fstab_swap`` says; ``/boot/grub/grubenv`` exists (``grub-editenv create``) and
``/boot/grub/grub.cfg`` was written by ``update-grub`` in a chroot of the loop-mounted
root with a private, udev-like /dev holding ``/dev/disk/by-uuid/ROOT_UUID``, so its
``linux`` lines say ``root=UUID=ROOT_UUID`` as on an installed system. (Run with the
host's /dev bound, as the runtime does, update-grub writes ``root=/dev/loopNpM``: the
host has no udev and no ``/dev/disk``.) grub.cfg carries no ``--hint`` lines (grub-probe
finds no BIOS drive for a loop device). GRUB's boot code is in the MBR and a core.img in
the gap before p1, as grub-install leaves them (this host's boot.img and grub-mkimage,
prefix ``(hd0,msdos1)/boot/grub``): the runtime refuses a disk whose MBR does not start
GRUB. ``/boot/grub/i386-pc`` stays empty, so these disks do not boot: installing GRUB for
real is the VM rig's business (tests.rig.bootable).

All of it needs root: loop devices, partx, mount, chroot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import os
import random
import re
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.imaging import MKE2FS_CONF, cached, grub_boot_code, key, write_at
from tests.rig import CommandError, RigError, run
from tests.rig.rootfs import debian_rootfs, mounts_below, rootfs_key, unmount_below, unpack

__all__ = [
    "SwapPlacement",
    "Alignment",
    "LegacySpec",
    "LegacyDevice",
    "Partition",
    "ROOT_LABEL",
    "ROOT_UUID",
    "DISK_ID",
    "APPDATA_DIR",
    "APPDATA_SYMLINKS",
    "APPDATA_EMPTY_DIRS",
    "APPDATA_OWNERS",
    "SWAPFILE_MIB",
    "TRACK",
    "CYLINDER",
    "appdata_files",
    "partitions",
    "spec_of_image",
    "sfdisk_script",
    "fstab_text",
    "make_legacy_image",
    "cached_legacy_image",
    "copy_legacy_image",
    "attached",
    "mounted_root",
    "chroot_binds",
]

log = logging.getLogger(__name__)

SECTOR = 512
MiB = 1 << 20
_MIB_SECTORS = MiB // SECTOR

ROOT_LABEL = "legacy-root"
ROOT_UUID = "3f2b9c1e-7d4a-4e8b-9a61-2c5d8e0f1a37"
DISK_ID = 0x1E9AC1D5
SWAPFILE_MIB = 64
#: DOS compatibility (Alignment.CYLINDER): 63 sectors a track, 255 heads
TRACK = 63
CYLINDER = 255 * TRACK


# --------------------------------------------------------------------------- spec


class SwapPlacement(enum.Enum):
    PRIMARY = "primary"
    LOGICAL = "logical"


class Alignment(enum.Enum):
    """Where partitions start: 1 MiB boundaries, or DOS cylinders with p1 at sector 63."""

    MIB = "mib"
    CYLINDER = "cylinder"


@dataclasses.dataclass(frozen=True)
class LegacySpec:
    """What the legacy disk looks like. Sizes in MiB; the image file is sparse."""

    placement: SwapPlacement = SwapPlacement.PRIMARY
    disk_mib: int = 3072
    root_mib: int = 1536  # ignored without a swap partition (root fills the disk)
    swap_mib: int = 1024  # the area the flasher partitions will replace
    fstab_swap: str = "UUID"  # how /etc/fstab names the swap: "UUID", "LABEL" or "PATH"
    swap_label: str = "legacy-swap"
    swap_uuid: str = "8c6f1e2a-4b3d-4f5e-a7c9-0d1e2f3a4b5c"
    with_swap_partition: bool = True  # False: a swap file /swapfile instead (refusal case)
    appdata: bool = True  # /srv/appdata: a small deterministic dataset (~2 MiB)
    alignment: Alignment = Alignment.MIB  # CYLINDER: p1 at sector 63 (see the docstring)

    def __post_init__(self) -> None:
        if self.fstab_swap not in ("UUID", "LABEL", "PATH"):
            raise ValueError(f"fstab_swap must be UUID, LABEL or PATH, not {self.fstab_swap!r}")
        partitions(self)  # raises ValueError when the sizes do not fit

    @property
    def swap_number(self) -> int | None:
        """The swap partition's number (2 or 5), None with a swap file."""
        if not self.with_swap_partition:
            return None
        return 2 if self.placement is SwapPlacement.PRIMARY else 5

    @property
    def installed_swap_path(self) -> str | None:
        """The swap partition as the installed system names it (first disk: /dev/sda)."""
        n = self.swap_number
        return None if n is None else f"/dev/sda{n}"


@dataclasses.dataclass(frozen=True)
class Partition:
    number: int
    start: int  # sectors
    size: int  # sectors
    type: str  # msdos type, hex without 0x
    bootable: bool = False

    @property
    def end(self) -> int:
        """First sector after the partition."""
        return self.start + self.size


def _cylinders(mib: int) -> int:
    """Whole cylinders holding at least mib MiB."""
    return -(-mib * _MIB_SECTORS // CYLINDER)


def _cylinder_partitions(spec: LegacySpec, disk: int) -> list[Partition]:
    last = disk // CYLINDER * CYLINDER  # fdisk leaves the partial last cylinder unused
    if not spec.with_swap_partition:
        return [Partition(1, TRACK, last - TRACK, "83", True)]
    root_end = _cylinders(spec.root_mib) * CYLINDER
    root = Partition(1, TRACK, root_end - TRACK, "83", True)
    swap_size = _cylinders(spec.swap_mib) * CYLINDER
    if spec.placement is SwapPlacement.PRIMARY:
        return [root, Partition(2, root_end, swap_size, "82")]
    ext = Partition(2, root_end, last - root_end, "5")
    return [root, ext, Partition(5, ext.start + TRACK, swap_size - TRACK, "82")]


def partitions(spec: LegacySpec) -> list[Partition]:
    """The partition table of spec, in sectors (its alignment: see the module docstring)."""
    disk = spec.disk_mib * _MIB_SECTORS
    first = _MIB_SECTORS
    if spec.alignment is Alignment.CYLINDER:
        parts = _cylinder_partitions(spec, disk)
    elif not spec.with_swap_partition:
        parts = [Partition(1, first, disk - first, "83", True)]
    else:
        root = Partition(1, first, spec.root_mib * _MIB_SECTORS, "83", True)
        swap_size = spec.swap_mib * _MIB_SECTORS
        if spec.placement is SwapPlacement.PRIMARY:
            parts = [root, Partition(2, root.end, swap_size, "82")]
        else:
            ext = Partition(2, root.end, disk - root.end, "5")
            parts = [root, ext, Partition(5, ext.start + _MIB_SECTORS, swap_size, "82")]
    if min(p.size for p in parts) <= 0 or max(p.end for p in parts) > disk:
        gap = "1 MiB" if spec.alignment is Alignment.MIB else "63 sectors, whole cylinders"
        raise ValueError(
            f"partitions do not fit a {spec.disk_mib} MiB disk: root {spec.root_mib} MiB, "
            f"swap {spec.swap_mib} MiB, {gap} before p1 (and before p5)"
        )
    return parts


def sfdisk_script(spec: LegacySpec) -> str:
    lines = ["label: dos", f"label-id: 0x{DISK_ID:08x}", "unit: sectors", ""]
    for p in partitions(spec):
        line = f"start={p.start}, size={p.size}, type={p.type}"
        lines.append(line + (", bootable" if p.bootable else ""))
    return "\n".join(lines) + "\n"


def fstab_text(spec: LegacySpec) -> str:
    """/etc/fstab as the Debian installer writes it."""
    root_dev = "/dev/sda1"
    lines = [
        "# /etc/fstab: static file system information.",
        "#",
        "# Use 'blkid' to print the universally unique identifier for a",
        "# device; this may be used with UUID= as a more robust way to name devices",
        "# that works even if disks are added and removed. See fstab(5).",
        "#",
        "# systemd generates mount units based on this file, see systemd.mount(5).",
        "# Please run 'systemctl daemon-reload' after you make changes here.",
        "#",
        "# <file system> <mount point>   <type>  <options>       <dump>  <pass>",
        f"# / was on {root_dev} during installation",
        f"UUID={ROOT_UUID} /               ext4    errors=remount-ro 0       1",
    ]
    if spec.with_swap_partition:
        path = spec.installed_swap_path
        name = {
            "UUID": f"UUID={spec.swap_uuid}",
            "LABEL": f"LABEL={spec.swap_label}",
            "PATH": path,
        }[spec.fstab_swap]
        lines.append(f"# swap was on {path} during installation")
        lines.append(f"{name} none            swap    sw              0       0")
    else:
        lines.append("/swapfile none            swap    sw              0       0")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- appdata

APPDATA_DIR = "srv/appdata"
#: symlinks in APPDATA_DIR: name -> target
APPDATA_SYMLINKS = {"current": "config/app.json"}
APPDATA_EMPTY_DIRS = ("cache",)
#: files not owned by root: name -> (uid, gid, mode)
APPDATA_OWNERS = {"secrets/token": (1000, 1000, 0o600)}

_WORDS = ["ok", "warn", "error", "door", "temp", "sensor", "sync", "upload", "retry", "cache"]


def _rng(name: str) -> random.Random:
    return random.Random(hashlib.sha256(f"legacy-appdata:{name}".encode()).digest())


def _text(name: str, size: int) -> bytes:
    rng = _rng(name)
    out = []
    n = 0
    i = 0
    while n < size:
        stamp = f"2020-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z"
        line = stamp + " " + " ".join(rng.choices(_WORDS, k=9))
        out.append(line)
        n += len(line) + 1
        i += 1
    return ("\n".join(out) + "\n").encode()


def appdata_files() -> dict[str, bytes]:
    """The regular files of /srv/appdata (paths relative to it) and their bytes: about
    2 MiB, nested directories, a binary file, a non-root private file. Deterministic."""
    return {
        "README.txt": b"Application data of the legacy device (test fixture).\n",
        "config/app.json": (
            json.dumps({"name": "legacy-app", "version": 3, "peers": ["a", "b"]}, indent=2) + "\n"
        ).encode(),
        "config/nested/deeper/settings.ini": b"[main]\ninterval = 30\nmode = batch\n",
        "db/store.bin": _rng("db/store.bin").randbytes(1536 * 1024 + 123),
        "logs/2020/01/app.log": _text("logs/2020/01/app.log", 448 * 1024),
        "secrets/token": hashlib.sha256(b"legacy-token").hexdigest().encode() + b"\n",
        "with space/name with space.txt": b"file names with spaces survive\n",
    }


#: The volume the backup of /srv/appdata fills: a single-container app's, the runtime's
#: default --backup-volumes.
BACKUP_VOLUME = "resin-data"


def backup_script_text(source: str) -> str:
    """The customer's backup script, as the README shows it: the data into DIR/VOLUME/."""
    return (f'#!/bin/sh\nset -e\nmkdir "$1/{BACKUP_VOLUME}"\n'
            f'cp -a "{source}/." "$1/{BACKUP_VOLUME}/"\n')


def restored_files() -> dict[str, str]:
    """{VOLUME/path: sha256} of the files the Supervisor restores from that backup."""
    return {f"{BACKUP_VOLUME}/{name}": hashlib.sha256(data).hexdigest()
            for name, data in appdata_files().items()}


def _write_appdata(root: Path) -> None:
    base = root / APPDATA_DIR
    for rel, data in appdata_files().items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chmod(path, 0o644)
    for rel in APPDATA_EMPTY_DIRS:
        (base / rel).mkdir(parents=True, exist_ok=True)
    for rel, target in APPDATA_SYMLINKS.items():
        (base / rel).symlink_to(target)
    for rel, (uid, gid, mode) in APPDATA_OWNERS.items():
        os.chown(base / rel, uid, gid)
        os.chmod(base / rel, mode)
        os.chown((base / rel).parent, uid, gid)
        os.chmod((base / rel).parent, 0o700)


# --------------------------------------------------------------------------- loop + mount


@dataclasses.dataclass
class LegacyDevice:
    image: Path
    device: str  # e.g. /dev/loop3
    spec: LegacySpec

    def partition(self, number: int) -> str:
        """The partition's device node, e.g. /dev/loop3p5."""
        return f"{self.device}p{number}"

    @property
    def root(self) -> str:
        return self.partition(1)

    @property
    def swap(self) -> str | None:
        n = self.spec.swap_number
        return None if n is None else self.partition(n)


def _mib_of_cylinders(end: int) -> int:
    """The smallest size in MiB that _cylinders rounds up to end (sectors, a whole number
    of cylinders)."""
    return (end // CYLINDER - 1) * CYLINDER // _MIB_SECTORS + 1


def spec_of_image(image: Path) -> LegacySpec:
    """The spec of a legacy image as far as its partition table tells: placement, disk,
    root and swap sizes, swap partition or not, alignment; the other fields are the
    defaults. With Alignment.CYLINDER the sizes are the smallest that give the table's
    cylinders (partitions() of the result is the table; the sizes it was built with may
    have been larger by up to a cylinder)."""
    table = json.loads(run(["sfdisk", "--json", image]).stdout)["partitiontable"]
    parts = {int(re.sub(r"^.*?(\d+)$", r"\1", p["node"])): p for p in table["partitions"]}
    disk_mib = Path(image).stat().st_size // MiB if Path(image).is_file() else 0
    if not disk_mib:
        disk_mib = int(run(["blockdev", "--getsize64", image]).stdout) // MiB
    cylinder = 1 in parts and parts[1]["start"] == TRACK
    alignment = Alignment.CYLINDER if cylinder else Alignment.MIB
    root_mib = parts[1]["size"] // _MIB_SECTORS if 1 in parts else 0
    if cylinder:
        root_mib = _mib_of_cylinders(parts[1]["start"] + parts[1]["size"])
    swaps = [n for n, p in parts.items() if p["type"] == "82"]
    if not swaps:
        return LegacySpec(disk_mib=disk_mib, with_swap_partition=False, alignment=alignment)
    placement = SwapPlacement.PRIMARY if swaps[0] < 5 else SwapPlacement.LOGICAL
    swap_mib = parts[swaps[0]]["size"] // _MIB_SECTORS
    if cylinder:
        swap_mib = _mib_of_cylinders(parts[swaps[0]]["size"] + (TRACK if swaps[0] >= 5 else 0))
    return LegacySpec(placement, disk_mib=disk_mib, root_mib=root_mib, swap_mib=swap_mib,
                      alignment=alignment)


def _wait_for_nodes(nodes: list[str], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        missing = [n for n in nodes if not os.path.exists(n)]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RigError(f"partition device nodes did not appear: {', '.join(missing)}")
        time.sleep(0.05)


def _detach(device: str) -> None:
    """partx -d then losetup -d (retrying partx briefly while a partition is still
    busy); raises RigError when the partitions could not be removed."""
    error: CommandError | None = None
    for attempt in range(10):
        try:
            run(["partx", "-d", device])
            error = None
            break
        except CommandError as exc:
            if _partx_gone(device):
                error = None
                break
            error = exc
            time.sleep(0.1 * (attempt + 1))
    try:
        run(["losetup", "-d", device])
    except CommandError as exc:
        error = error or exc
    if error is not None:
        raise RigError(f"could not detach {device} cleanly: {error}")


def _partx_gone(device: str) -> bool:
    name = os.path.basename(device)
    return not any((Path("/sys/block") / name).glob(f"{name}p*"))


@contextlib.contextmanager
def attached(
    image: Path, spec: LegacySpec | None = None, *, read_only: bool = False
) -> Iterator[LegacyDevice]:
    """Attach image to a free loop device and add its partitions (partx -a); always
    removes the partitions (partx -d: all the kernel knows, also those the body added
    or deleted with BLKPG) and detaches on the way out.

    spec: what the image was built from; when omitted, spec_of_image(image).
    """
    image = Path(image)
    if spec is None:
        spec = spec_of_image(image)
    argv = ["losetup", "-f", "--show"] + (["-r"] if read_only else []) + [str(image)]
    device = run(argv).stdout.strip()
    try:
        run(["partx", "-a", device])
        numbers = run(["partx", "-g", "-o", "NR", device]).stdout.split()
        _wait_for_nodes([f"{device}p{n}" for n in numbers])
        yield LegacyDevice(image=image, device=device, spec=spec)
    finally:
        _detach(device)


@contextlib.contextmanager
def mounted_root(device: LegacyDevice, *, read_only: bool = False,
                 options: tuple[str, ...] = ()) -> Iterator[Path]:
    """Mount the root partition (p1) on a new temporary directory and yield it; always
    unmounts it and everything mounted below it (binds a test or the runtime made),
    lazily when busy, and removes the directory.

    options: extra mount options, e.g. ("noatime", "noinit_itable") so that only what
    the code under test writes changes the disk's bytes."""
    mountpoint = Path(tempfile.mkdtemp(prefix="legacy-sysroot-"))
    try:
        flags = (["ro"] if read_only else []) + list(options)
        options_argv = ["-o", ",".join(flags)] if flags else []
        run(["mount", "-t", "ext4", *options_argv, device.root, mountpoint])
        yield mountpoint
    finally:
        try:
            unmount_below(mountpoint)
        finally:
            if not mounts_below(mountpoint):
                mountpoint.rmdir()


@contextlib.contextmanager
def chroot_binds(sysroot: Path) -> Iterator[Path]:
    """/dev, /proc and /sys of the host inside sysroot, as the runtime sets them up to
    chroot and run GRUB's tools; unmounted on the way out."""
    done: list[Path] = []
    try:
        for target, argv in (
            ("dev", ["mount", "--bind", "/dev"]),
            ("proc", ["mount", "-t", "proc", "proc"]),
            ("sys", ["mount", "--bind", "/sys"]),
        ):
            path = sysroot / target
            path.mkdir(exist_ok=True)
            run([*argv, path])
            done.append(path)
        yield sysroot
    finally:
        for path in reversed(done):
            unmount_below(path)


# --------------------------------------------------------------------------- build


def _mkfs_env(workdir: Path) -> dict[str, str]:
    """Pinned mkfs.ext4 defaults (Debian 12's, which GRUB 2.06 and Linux 6.1 read), so the
    host's /etc/mke2fs.conf does not change the filesystem."""
    conf = workdir / "mke2fs.conf"
    conf.write_text(MKE2FS_CONF)
    return {"MKE2FS_CONFIG": str(conf)}


@contextlib.contextmanager
def _installer_dev(root: Path, device: LegacyDevice) -> Iterator[None]:
    """A private /dev (tmpfs) in root, as udev would have it on the installed system:
    the basic character devices, the disk and its partitions, and
    /dev/disk/by-uuid/ROOT_UUID, so that update-grub writes root=UUID=... (with the host's
    /dev it writes root=/dev/loopNpM); plus /proc and /sys. Unmounted on the way out."""
    dev = root / "dev"
    try:
        run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=1m", "tmpfs", dev])
        for name in ("null", "zero", "full", "random", "urandom", "tty"):
            st = os.stat(f"/dev/{name}")
            os.mknod(dev / name, stat.S_IFCHR | 0o666, st.st_rdev)
        nodes = [device.device] + [device.partition(p.number) for p in partitions(device.spec)]
        for node in nodes:
            os.mknod(dev / os.path.basename(node), stat.S_IFBLK | 0o660, os.stat(node).st_rdev)
        (dev / "disk/by-uuid").mkdir(parents=True)
        (dev / "disk/by-uuid" / ROOT_UUID).symlink_to(f"../../{os.path.basename(device.root)}")
        run(["mount", "-t", "proc", "proc", root / "proc"])
        run(["mount", "--bind", "/sys", root / "sys"])
        yield
    finally:
        for sub in ("sys", "proc", "dev"):
            unmount_below(root / sub)


def _populate(root: Path, spec: LegacySpec, tarball: Path, device: LegacyDevice) -> None:
    unpack(tarball, root)
    (root / "etc/fstab").write_text(fstab_text(spec))
    if not spec.with_swap_partition:
        swapfile = root / "swapfile"
        with open(swapfile, "wb") as f:  # written, not fallocated: swapon refuses holes
            os.fchmod(f.fileno(), 0o600)
            chunk = bytes(MiB)
            for _ in range(SWAPFILE_MIB):
                f.write(chunk)
        run(["mkswap", swapfile])
    if spec.appdata:
        _write_appdata(root)
    run(["chroot", root, "grub-editenv", "/boot/grub/grubenv", "create"])
    with _installer_dev(root, device):
        run(["chroot", root, "update-grub"])
    cfg = root / "boot/grub/grub.cfg"
    text = cfg.read_text() if cfg.is_file() else ""
    if "menuentry " not in text or f"root=UUID={ROOT_UUID} " not in text:
        raise RigError(f"update-grub wrote no menu entry with root=UUID={ROOT_UUID} in {cfg}")
    if not (root / "boot/grub/grubenv").is_file():
        raise RigError(f"grub-editenv wrote no {root / 'boot/grub/grubenv'}")


def make_legacy_image(path: Path, spec: LegacySpec = LegacySpec()) -> None:
    """Write the legacy disk image of spec to path (sparse). Needs root."""
    if os.geteuid() != 0:
        raise RigError("building a legacy image needs root (loop devices, mount, chroot)")
    path = Path(path)
    tarball = debian_rootfs()
    with open(path, "wb") as f:
        f.truncate(spec.disk_mib * MiB)
    run(["sfdisk", "--no-reread", "--no-tell-kernel", path], stdin=sfdisk_script(spec))
    with tempfile.TemporaryDirectory(prefix="legacy-grub-") as tmp:
        boot_img, core_img = grub_boot_code(Path(tmp), prefix="(hd0,msdos1)/boot/grub")
    gap = (partitions(spec)[0].start - 1) * SECTOR
    if len(core_img) > gap:  # Alignment.CYLINDER: 62 sectors
        raise RigError(f"this host's core.img ({len(core_img)} bytes) does not fit the "
                       f"{gap} bytes before p1 of {spec}")
    write_at(path, 0, boot_img[:440])     # disk identifier and table stay
    write_at(path, SECTOR, core_img)
    with tempfile.TemporaryDirectory(prefix="legacy-build-") as tmp, attached(path, spec) as dev:
        env = _mkfs_env(Path(tmp))
        argv = ["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-U", ROOT_UUID, dev.root]
        run(argv, env=env)
        if dev.swap is not None:
            run(["mkswap", "-L", spec.swap_label, "-U", spec.swap_uuid, dev.swap])
        with mounted_root(dev) as root:
            _populate(root, spec, tarball, dev)
        run(["e2fsck", "-fn", dev.root])


def legacy_key(spec: LegacySpec) -> str:
    return key(spec, rootfs_key(), Path(__file__))


def cached_legacy_image(spec: LegacySpec = LegacySpec()) -> Path:
    """Path of the legacy image of spec, built once into cache_dir() and reused. Never
    modify it: copy it first (copy_legacy_image)."""
    debian_rootfs()  # outside the temporary image's lifetime: it takes a while
    return cached(f"legacy-{legacy_key(spec)}.img", lambda tmp: make_legacy_image(tmp, spec))


def copy_legacy_image(spec: LegacySpec, dest: Path) -> Path:
    """A throwaway sparse copy of the cached image of spec at dest."""
    run(["cp", "--sparse=always", cached_legacy_image(spec), dest])
    return Path(dest)
