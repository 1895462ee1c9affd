"""Bootable stand-ins for the intel-nuc flasher and the resinOS image inside it.

Same shapes as ``tests.synthetic`` (REFERENCE.md's tables, labels, files, the flag file and
config.json), but a legacy BIOS really boots them in QEMU:

- ``bootable_resinos_image(path)``: msdos, 4 MiB aligned, the first 4 MiB holding GRUB
  (i386-pc ``boot.img`` in the MBR's first 440 bytes, a ``core.img`` made by
  ``grub-mkimage`` from sector 1, prefix ``(hd0,msdos1)/grub``); resin-boot (FAT16: the
  Debian kernel as ``/bzImage``, ``/initrd``, ``/config.json``, ``/grub/grub.cfg`` and
  ``/grub/i386-pc/``), resin-rootA (ext4: busybox, util-linux ``blkid``, the FAT modules and
  an ``/sbin/init`` that reports what the disk holds on ttyS0, ``RESINOS-REPORT key=value``
  lines, then powers off), resin-rootB, extended, resin-state, resin-data (ext4, about
  27 MiB free for a backup); 136 MiB raw. ``parse_report()`` reads the report back.
- ``bootable_flasher_image(path)``: the flasher table (flash-boot FAT16 with config.json,
  the ``resin-image-flasher`` flag file, ``/vmlinuz``, ``/initrd`` and ``/grub.cfg``
  booting ``linux /vmlinuz root=LABEL=flash-rootA rootwait console=ttyS0,115200``;
  flash-rootA ext4; flash-rootB; extended; flash-state; flash-data) with GRUB in its own
  first 4 MiB too. flash-rootA holds ``/opt/resin-image-genericx86-64.resinos-img`` (the
  resinOS stand-in, stored sparse), a placeholder ``/usr/bin/resin-init-flasher`` (the
  builder installs the real stage 2 there), ``/etc/resin-init-flasher.conf``, and a small
  userland: bash, util-linux, coreutils, sed, grep, gzip and zstd copied from the rig's
  Debian rootfs with their shared libraries, busybox for the rest (``reboot``,
  ``insmod``...), the loop and FAT modules, and an ``/sbin/init`` (bash) that mounts
  /proc, /sys, /dev, /tmp and /run, loads the modules, runs
  ``bash /usr/bin/resin-init-flasher`` and, if it returns, ``reboot -f``.

Both boot the Debian kernel of ``tests.rig.rootfs`` with a small initramfs made by that
rootfs's own ``mkinitramfs`` (initramfs-tools, ``MODULES=list``: the disk drivers and ext4,
about 6 MiB instead of the 30 MiB ``MODULES=most`` one). It finds ``root=LABEL=...``
through udev, mounts it read-only and runs its ``/sbin/init``, with /dev, /proc, /sys and
/run already mounted (moved there from the initramfs).

Built rootless where it can be (sfdisk on files, ``mkfs.fat`` + mtools, ``mkfs.ext4 -d``;
no mounts), deterministic (fixed UUIDs, ids and times, as in ``tests.synthetic``). The
pieces taken from the rootfs (kernel, initramfs, GRUB, tools, modules: the *boot kit*) are
made once in a chroot of the unpacked rootfs, which needs root, and cached in
``cache_dir()/bootkit-<key>/``; busybox comes from Debian's ``busybox-static`` package
(``apt-get download``, the .deb kept in ``cache_dir()``; else the host's installed
package). ``cached_bootable_flasher()``
and ``cached_bootable_resinos()`` keep the images in ``cache_dir()``, keyed by this file,
``tests/synthetic.py`` and the rootfs key.

``boot_disk()`` boots a disk image by BIOS in QEMU (TCG, IDE, serial on a file) and
returns the serial log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from tests import synthetic
from tests.rig import CommandError, RigError, base_env, run
from tests.rig.rootfs import debian_rootfs, rootfs_key, unpack
from tests.synthetic import EPOCH, INNER_NAME, cache_dir

__all__ = [
    "INNER_NAME",
    "REPORT_MARKER",
    "INIT_MARKER",
    "RESINOS_CONFIG",
    "FLASHER_CONFIG",
    "FLASHER_CMDLINE",
    "BootResult",
    "ResinosReport",
    "boot_kit",
    "bootable_resinos_image",
    "bootable_flasher_image",
    "cached_bootable_resinos",
    "cached_bootable_flasher",
    "is_cached",
    "bootimages_key",
    "parse_report",
    "replace_in_ext4",
    "partition_offsets",
    "qemu_boot_argv",
    "boot_disk",
    "sparse_copy",
]

log = logging.getLogger(__name__)

SECTOR = 512
KiB = 1 << 10
MiB = 1 << 20
ALIGN = 4 * MiB

REPORT_MARKER = "RESINOS-REPORT"
INIT_MARKER = "RESIN-FLASHER-INIT"

#: The resinOS stand-in's own config.json (stage 2 replaces it with the fleet's).
RESINOS_CONFIG = b'{"deviceType": "intel-nuc", "persistentLogging": false}\n'
#: The flasher's config.json on flash-boot (the builder replaces it with --config).
FLASHER_CONFIG = b'{"deviceType": "intel-nuc", "applicationName": "bootable-test"}\n'
#: The flasher's kernel arguments (its grub.cfg; the builder copies them to the manifest).
FLASHER_CMDLINE = "root=LABEL=flash-rootA rootwait console=ttyS0,115200"
RESINOS_CMDLINE = "root=LABEL=resin-rootA rootwait console=ttyS0,115200"

# resinOS stand-in: REFERENCE's shape, partitions as small as the contents allow (stage 2
# writes and reads back every byte of the image, about 10 MB/s under TCG): 136 MiB raw
_RESIN_BOOT_SIZE = 40 * MiB  # as in REFERENCE; kernel, initramfs and GRUB take 17 MiB
_RESIN_ROOT_SIZE = 16 * MiB  # busybox, blkid and its libraries, modules: 5 MiB
_RESIN_STATE_SIZE = 20 * MiB  # as in REFERENCE
_RESIN_DATA_SIZE = 32 * MiB  # about 27 MiB free for backup.tgz
# flasher
_FLASH_BOOT_SIZE = 40 * MiB  # 81920 sectors, as in the real flasher
_FLASH_ROOTB_SIZE = 4 * MiB
_FLASH_STATE_SIZE = 4 * MiB
_FLASH_DATA_SIZE = 8 * MiB
_ROOTA_FREE_FACTOR = 1.2  # the builder shrinks flash-rootA anyway
_ROOTA_OVERHEAD = 16 * MiB

_TYPE_FAT16_LBA = "e"
_TYPE_LINUX = "83"
_SEED = 1

# --------------------------------------------------------------------------- the boot kit

#: Disk drivers and the root filesystem in the initramfs (its hooks add their dependencies
#: and a few base modules): IDE (QEMU's default disk), AHCI, virtio, and ext4.
INITRAMFS_MODULES = ("ata_piix", "ahci", "sd_mod", "virtio_pci", "virtio_blk", "ext4")
#: Loaded by both inits from the root filesystem: loop devices (stage 2 reaches resin-boot
#: and resin-data through them) and FAT (this kernel's defaults: codepage 437, iocharset
#: ascii; utf8 and iso8859-1 for mounts that ask for them).
ROOT_MODULES = ("loop", "vfat", "nls_cp437", "nls_ascii", "nls_utf8", "nls_iso8859-1")
#: Embedded in core.img, so GRUB needs nothing from disk but its grub.cfg.
GRUB_MODULES = (
    "biosdisk", "part_msdos", "fat", "ext2", "normal", "linux", "search", "search_label",
    "search_fs_uuid", "configfile", "echo", "serial", "terminal", "test", "sleep", "minicmd",
)
GRUB_PREFIX = "(hd0,msdos1)/grub"

#: What stage 2 runs (its `need` lines and the rest of runtime/resin-init-flasher), from the
#: rootfs with their libraries; busybox provides everything else.
FLASHER_TOOLS = (
    "bash", "blkid", "losetup", "mount", "umount", "mountpoint", "blockdev", "findmnt",
    "lsblk", "dd", "sha256sum", "head", "tail", "stat", "od", "tr", "sed", "cut", "date",
    "readlink", "basename", "dirname", "cp", "mkdir", "rm", "sync", "cat", "ls", "ln",
    "mv", "uname", "sleep", "wc", "tee", "touch", "chmod", "env", "true", "false", "sort",
    "printf", "echo", "test", "grep", "gzip", "zstd",
)
RESINOS_TOOLS = ("blkid",)

_KIT_VERSION = 1
_CHROOT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def bootimages_key() -> str:
    """Key of the boot kit and the cached images: this file, tests/synthetic.py (whose
    helpers build the filesystems) and the rootfs key."""
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(Path(synthetic.__file__).read_bytes())
    h.update(rootfs_key().encode())
    return h.hexdigest()[:20]


@dataclasses.dataclass(frozen=True)
class BootKit:
    """The pieces taken from the rig's rootfs, in a cached directory."""

    root: Path
    kernel_version: str
    modules: tuple[str, ...]  # below usr/lib/modules/<version>/, in load order
    resinos_files: tuple[str, ...]  # below files/, relative, in copy order
    flasher_files: tuple[str, ...]
    applets: tuple[str, ...]  # busybox --list-full

    @property
    def vmlinuz(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.root / "initrd.img"

    @property
    def boot_img(self) -> Path:
        return self.root / "grub" / "boot.img"

    @property
    def core_img(self) -> Path:
        return self.root / "grub" / "core.img"

    @property
    def grub_dir(self) -> Path:
        """Modules and lists for /grub/i386-pc on the boot partition."""
        return self.root / "grub" / "i386-pc"

    @property
    def files(self) -> Path:
        return self.root / "files"

    @property
    def busybox(self) -> Path:
        return self.root / "busybox"


def _chroot(tree: Path, *argv: str | os.PathLike[str], timeout: float = 600) -> str:
    env = {"PATH": _CHROOT_PATH, "SOURCE_DATE_EPOCH": str(EPOCH), "LC_ALL": "C"}
    args = ["chroot", str(tree), "env", "-i", *(f"{k}={v}" for k, v in env.items())]
    return run([*args, *(os.fspath(a) for a in argv)], timeout=timeout).stdout


def _copy_in(src_root: Path, path: str, dest_root: Path, copied: list[str]) -> None:
    """Copy the absolute path of src_root into dest_root at the same place; the symlinks
    met on the way (/lib -> usr/lib, ld.so's link) are recreated as they are. Appends every
    entry the path needs (relative) to copied, made now or before."""
    rel = os.path.normpath(path.lstrip("/"))
    for _ in range(40):  # symlink hops
        parts = Path(rel).parts
        for i in range(len(parts)):
            prefix = os.path.join(*parts[: i + 1])
            src = src_root / prefix
            if src.is_symlink():
                target = os.readlink(src)
                dest = dest_root / prefix
                if not dest.is_symlink():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(target, dest)
                if prefix not in copied:
                    copied.append(prefix)
                base = "" if target.startswith("/") else os.path.dirname(prefix)
                rest = parts[i + 1:]
                rel = os.path.normpath(os.path.join(base, target.lstrip("/"), *rest))
                break
        else:
            src = src_root / rel
            dest = dest_root / rel
            if not src.is_file():
                raise RigError(f"rootfs: /{rel} is not a regular file")
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)
                os.chmod(dest, src.stat().st_mode & 0o7777)
            if rel not in copied:
                copied.append(rel)
            return
    raise RigError(f"rootfs: too many symlinks resolving {path}")


def _resolve_tools(tree: Path, names: Sequence[str]) -> list[str]:
    """Absolute paths (in the tree) of the named programs, searched in /usr/sbin and
    /usr/bin (the rootfs has a merged /usr)."""
    found, missing = [], []
    for name in names:
        for d in ("usr/sbin", "usr/bin"):
            candidate = tree / d / name
            if candidate.exists() and os.access(candidate, os.X_OK):
                found.append(f"/{d}/{name}")
                break
        else:
            missing.append(name)
    if missing:
        raise RigError(f"the rig's rootfs lacks {', '.join(missing)}")
    return found


def _libraries(tree: Path, binaries: Sequence[str]) -> list[str]:
    """The shared libraries (and loader) of binaries, per ldd inside the tree."""
    found: list[str] = []
    for binary in binaries:
        out = run(["chroot", str(tree), "/usr/bin/ldd", binary], ok_codes=(0, 1)).stdout
        if "not a dynamic executable" in out:
            continue
        for line in out.splitlines():
            line = line.strip()
            m = re.match(r"\S+ => (/\S+) \(0x", line) or re.match(r"(/\S+) \(0x", line)
            if m and m.group(1) not in found:
                found.append(m.group(1))
            elif "not found" in line:
                raise RigError(f"ldd {binary}: {line}")
    return found


def _module_order(modules_dep: str, wanted: Sequence[str]) -> list[str]:
    """Relative .ko paths of wanted modules and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[path] = rest.split()
        name = os.path.basename(path).split(".ko")[0].replace("-", "_")
        by_name[name] = path
    order: list[str] = []
    for name in wanted:
        key = name.replace("-", "_")
        if key not in by_name:
            raise RigError(f"the rootfs kernel has no module {name} (built in?)")
        path = by_name[key]
        for dep in [*reversed(deps[path]), path]:
            if dep not in order:
                order.append(dep)
    return order


def _busybox_deb(workdir: Path) -> Path | None:
    """Debian's busybox-static package: cached in cache_dir(), else `apt-get download`
    (kept in cache_dir() for next time); None when apt cannot get it."""
    directory = cache_dir()
    cached = sorted(directory.glob("busybox-static_*.deb"))
    if cached:
        return cached[-1]
    fetch = workdir / "apt"
    fetch.mkdir()
    try:
        proc = subprocess.run(["apt-get", "download", "-q", "busybox-static"], cwd=fetch,
                              env=base_env(), capture_output=True, text=True, timeout=300,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        proc = subprocess.CompletedProcess([], -1, "", str(exc))
    debs = sorted(fetch.glob("busybox-static_*.deb"))
    if proc.returncode != 0 or not debs:
        log.warning("apt-get download busybox-static failed: %s", proc.stderr.strip())
        return None
    final = directory / debs[-1].name
    tmp = directory / f".{final.name}.{os.getpid()}.tmp"
    shutil.copyfile(debs[-1], tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, final)
    return final


def _host_busybox_static() -> Path | None:
    """The host's busybox when the busybox-static package is installed."""
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", "busybox-static"],
                          capture_output=True, text=True, check=False)
    binary = Path("/bin/busybox")
    if proc.stdout.endswith("installed") and binary.is_file():
        return binary
    return None


def _get_busybox(dest: Path, workdir: Path) -> None:
    """A static busybox at dest: from the busybox-static .deb, else the host's package."""
    deb = _busybox_deb(workdir)
    if deb is not None:
        unpacked = workdir / "busybox-deb"
        run(["dpkg-deb", "-x", deb, unpacked])
        binary = unpacked / "bin" / "busybox"
        if not binary.is_file():
            raise RigError(f"{deb}: no /bin/busybox in it")
    else:
        found = _host_busybox_static()
        if found is None:
            raise RigError(
                "no busybox-static: `apt-get download busybox-static` failed (`apt-get "
                "update` first?) and the package is not installed on this host (apt-get "
                f"install busybox-static), nor is its .deb in {cache_dir()}"
            )
        binary = found
    shutil.copyfile(binary, dest)
    os.chmod(dest, 0o755)


_INITRAMFS_SETTINGS = {"MODULES": "list", "BUSYBOX": "n", "COMPRESS": "zstd", "KEYMAP": "n"}


def _make_initramfs(tree: Path, version: str, out: Path) -> None:
    """A small initramfs made by the rootfs's own mkinitramfs (MODULES=list)."""
    conf = tree / "tmp" / "resin-initramfs"
    shutil.copytree(tree / "etc" / "initramfs-tools", conf, symlinks=True)
    text = (conf / "initramfs.conf").read_text()
    for key, value in _INITRAMFS_SETTINGS.items():
        text, n = re.subn(rf"(?m)^{key}=.*$", f"{key}={value}", text)
        if not n:
            text += f"{key}={value}\n"
    (conf / "initramfs.conf").write_text(text)
    (conf / "modules").write_text("".join(f"{m}\n" for m in INITRAMFS_MODULES))
    _chroot(tree, "mkinitramfs", "-d", "/tmp/resin-initramfs", "-o", "/tmp/resin-initrd.img",
            version)
    shutil.copyfile(tree / "tmp" / "resin-initrd.img", out)


def _make_grub(tree: Path, dest: Path) -> None:
    dest.mkdir()
    _chroot(tree, "grub-mkimage", "-O", "i386-pc", "-d", "/usr/lib/grub/i386-pc",
            "-p", GRUB_PREFIX, "-o", "/tmp/resin-core.img", *GRUB_MODULES)
    shutil.copyfile(tree / "tmp" / "resin-core.img", dest / "core.img")
    core_size = (dest / "core.img").stat().st_size
    if core_size > ALIGN - SECTOR:
        raise RigError(f"core.img is {core_size} bytes: more than the reserved 4 MiB")
    source = tree / "usr" / "lib" / "grub" / "i386-pc"
    shutil.copyfile(source / "boot.img", dest / "boot.img")
    (dest / "i386-pc").mkdir()
    for item in sorted(source.iterdir()):
        if item.suffix in (".mod", ".lst") and item.is_file():
            shutil.copyfile(item, dest / "i386-pc" / item.name)


def _fill_kit(dest: Path) -> None:
    tree = dest / ".rootfs"
    tree.mkdir()
    try:
        unpack(debian_rootfs(), tree)
        kernels = sorted((tree / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            raise RigError(f"the rootfs has {len(kernels)} kernels in /boot, expected one")
        version = kernels[0].name.split("-", 1)[1]
        shutil.copyfile(kernels[0], dest / "vmlinuz")
        _make_initramfs(tree, version, dest / "initrd.img")
        _make_grub(tree, dest / "grub")

        files = dest / "files"
        files.mkdir()
        lists: dict[str, list[str]] = {}
        for name, tools in (("resinos", RESINOS_TOOLS), ("flasher", FLASHER_TOOLS)):
            binaries = _resolve_tools(tree, tools)
            copied: list[str] = []
            for path in [*binaries, *_libraries(tree, binaries)]:
                _copy_in(tree, path, files, copied)
            lists[name] = copied

        moddir = tree / "usr" / "lib" / "modules" / version
        order = _module_order((moddir / "modules.dep").read_text(), ROOT_MODULES)
        out_moddir = files / "usr" / "lib" / "modules" / version
        for rel in order:
            (out_moddir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(moddir / rel, out_moddir / rel)
        dep_lines = [
            line for line in (moddir / "modules.dep").read_text().splitlines()
            if line.split(":", 1)[0] in order
        ]
        (out_moddir / "modules.dep").write_text("\n".join(dep_lines) + "\n")

        _get_busybox(dest / "busybox", dest)
        applets = run([dest / "busybox", "--list-full"]).stdout.split()
        if "sbin/reboot" not in applets or "bin/sh" not in applets:
            raise RigError("this busybox lacks reboot or sh")
        kit = {
            "kit_version": _KIT_VERSION,
            "kernel_version": version,
            "modules": order,
            "resinos_files": lists["resinos"],
            "flasher_files": lists["flasher"],
            "applets": applets,
        }
        (dest / "kit.json").write_text(json.dumps(kit, indent=1) + "\n")
    finally:
        shutil.rmtree(tree, ignore_errors=True)
        for leftover in ("apt", "busybox-deb"):
            shutil.rmtree(dest / leftover, ignore_errors=True)


def boot_kit() -> BootKit:
    """The cached boot kit (made on first use, as root: unpack the rootfs, mkinitramfs and
    grub-mkimage in a chroot, ldd; about 15 s once the rootfs tarball exists)."""
    final = cache_dir() / f"bootkit-{bootimages_key()}"
    if not final.is_dir():
        if os.geteuid() != 0:
            raise RigError("making the boot kit needs root (the rootfs is unpacked with its "
                           "owners and used as a chroot); later runs reuse the cached kit")
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            started = time.monotonic()
            _fill_kit(tmp)
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
            log.info("boot kit made in %.0f s", time.monotonic() - started)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    data = json.loads((final / "kit.json").read_text())
    return BootKit(
        root=final,
        kernel_version=data["kernel_version"],
        modules=tuple(data["modules"]),
        resinos_files=tuple(data["resinos_files"]),
        flasher_files=tuple(data["flasher_files"]),
        applets=tuple(data["applets"]),
    )


# --------------------------------------------------------------------------- staging


class _Stage(synthetic._Tree):
    """A synthetic._Tree that also takes host files, symlinks and the kit's userland."""

    def copy(self, rel: str, src: Path, mode: int | None = None) -> None:
        dest = self.path(rel, mode if mode is not None else src.stat().st_mode & 0o777)
        shutil.copyfile(src, dest)

    def symlink(self, rel: str, target: str) -> None:
        rel = rel.strip("/")
        link = self.root / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(target, link)

    def exists(self, rel: str) -> bool:
        p = self.root / rel.strip("/")
        return p.is_symlink() or p.exists()

    def userland(self, kit: BootKit, entries: Iterable[str], modules: bool = True) -> None:
        """Merged /usr (bin, sbin, lib, lib64 -> usr/...), the kit's entries, the root
        modules, busybox with a link for every applet no copied tool provides."""
        for top in ("bin", "sbin", "lib", "lib64"):
            self.symlink(top, f"usr/{top}")
        for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64"):
            self.dir(d)
        for rel in entries:
            src = kit.files / rel
            if src.is_symlink():
                self.symlink(rel, os.readlink(src))
            else:
                self.copy(rel, src)
        if modules:
            base = f"usr/lib/modules/{kit.kernel_version}"
            for rel in kit.modules:
                self.copy(f"{base}/{rel}", kit.files / base / rel, 0o644)
            self.copy(f"{base}/modules.dep", kit.files / base / "modules.dep", 0o644)
        self.copy("usr/bin/busybox", kit.busybox, 0o755)
        for applet in kit.applets:
            name = os.path.basename(applet)
            if name in ("busybox", "init", "linuxrc") or "/" not in applet:
                continue
            if self.exists(f"usr/bin/{name}") or self.exists(f"usr/sbin/{name}"):
                continue
            if "sbin/" in applet:
                self.symlink(f"usr/sbin/{name}", "../bin/busybox")
            else:
                self.symlink(f"usr/bin/{name}", "busybox")
        for d in ("proc", "sys", "dev", "run", "tmp", "mnt", "root", "etc", "var", "opt"):
            self.dir(d)


def _make_fat(
    image: Path,
    size: int,
    label: str,
    hidden_sectors: int,
    files: Mapping[str, Path | bytes],
    workdir: Path,
) -> None:
    """A FAT16 filesystem of size bytes in the file image holding files (relative path ->
    host file or bytes); one mcopy per directory, sorted, times fixed."""
    if image.exists():
        image.unlink()
    synthetic._new_sparse(image, size)
    vol_id = f"{synthetic._fixed_u32(_SEED, 'fat', label):08x}"
    synthetic._run(["mkfs.fat", "--invariant", "-F", "16", "-S", "512", "-h", str(hidden_sectors),
                    "-n", label, "-i", vol_id, image])
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
        parent = os.path.dirname(rel)
        by_dir.setdefault(parent, []).append(rel)
    dirs: set[str] = set()
    for parent in by_dir:
        parts = Path(parent).parts
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    for d in sorted(dirs):
        synthetic._run(["mmd", "-i", image, f"::/{d}"])
    for parent, rels in sorted(by_dir.items()):
        target = f"::/{parent}/" if parent else "::/"
        synthetic._run(["mcopy", "-m", "-i", image, *(stage / r for r in sorted(rels)), target])
    shutil.rmtree(stage)
    synthetic._run(["fsck.fat", "-n", image])


def _write_boot_code(image: Path, kit: BootKit) -> None:
    """GRUB's boot.img in the MBR's first 440 bytes (the disk id and table stay), core.img
    from sector 1 (its blocklist says: from sector 2, as grub-mkimage made it)."""
    boot = kit.boot_img.read_bytes()
    core = kit.core_img.read_bytes()
    with open(image, "r+b") as f:
        f.write(boot[:440])
        f.seek(SECTOR)
        f.write(core)


def _grub_files(kit: BootKit) -> dict[str, Path | bytes]:
    return {f"grub/i386-pc/{p.name}": p for p in sorted(kit.grub_dir.iterdir())}


_GRUB_SERIAL = """\
serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1
terminal_input serial console
terminal_output serial console
"""

_RESINOS_GRUB_CFG = f"""\
{_GRUB_SERIAL}set default=boot
set timeout=0

menuentry 'resinOS (resin-migrate test stand-in)' --id boot {{
  search --no-floppy --set=root --label resin-boot
  linux /bzImage {RESINOS_CMDLINE}
  initrd /initrd
}}
"""

_FLASHER_GRUB_CFG = f"""\
default=flash
timeout=0

menuentry 'flash' --id flash {{
  linux /vmlinuz {FLASHER_CMDLINE}
  initrd /initrd
}}
"""

#: /grub/grub.cfg of the flasher's own GRUB (prefix (hd0,msdos1)/grub): serial, then the
#: flasher's /grub.cfg, which the builder reads.
_FLASHER_OWN_GRUB_CFG = f"{_GRUB_SERIAL}source /grub.cfg\n"


# --------------------------------------------------------------------------- resinOS


def _modules_words(kit: BootKit) -> str:
    return " ".join(kit.modules)


_RESINOS_INIT = r"""#!/bin/sh
# resinOS stand-in (resin-migrate tests): PID 1 on resin-rootA, started by the Debian
# initramfs. Reports what the disk holds on ttyS0, one "RESINOS-REPORT key=value" line
# each, then powers off.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
# (busybox has no mountpoint applet)
mounted() { awk -v d="$1" '$2 == d { found = 1 } END { exit !found }' /proc/mounts; }
[ -r /proc/mounts ] || mount -t proc proc /proc
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev
mounted /run || mount -t tmpfs -o mode=0755 tmpfs /run
mounted /tmp || mount -t tmpfs -o mode=1777 tmpfs /tmp
echo 4 > /proc/sys/kernel/printk  # kernel info messages would cut report lines

OUT=/dev/ttyS0
r() { printf '%s %s\n' "@MARKER@" "$*" > "$OUT"; }

r start
moddir=/usr/lib/modules/$(uname -r)
for m in @MODULES@; do
    name=$(basename "$m" .ko | tr - _)
    [ -d "/sys/module/$name" ] || insmod "$moddir/$m" || r "warning=insmod $m failed"
done
r "kernel=$(uname -r)"
r "cmdline=$(cat /proc/cmdline)"
r "root=$(awk '$2 == "/" { print $1 }' /proc/mounts | tail -n 1)"

labels=
for dev in $(blkid -c /dev/null -o device | sort); do
    label=$(blkid -c /dev/null -s LABEL -o value "$dev")
    [ -n "$label" ] || continue
    r "label=$label $dev"
    labels="$labels $label"
done
r "labels=$(printf '%s\n' $labels | sort | paste -s -d, -)"

boot=$(blkid -c /dev/null -L resin-boot)
if [ -n "$boot" ] && mount -t vfat -o ro "$boot" /mnt/boot; then
    if [ -f /mnt/boot/config.json ]; then
        r "config_sha256=$(sha256sum < /mnt/boot/config.json | cut -d' ' -f1)"
    else
        r "config_sha256=missing"
    fi
    if [ -e /mnt/boot/resin-migrate.log ]; then
        r "migrate_log=yes"
        r "migrate_log_sha256=$(sha256sum < /mnt/boot/resin-migrate.log | cut -d' ' -f1)"
    else
        r "migrate_log=no"
    fi
    if [ -d /mnt/boot/EFI ]; then r "boot_efi=yes"; else r "boot_efi=no"; fi
    for f in /mnt/boot/system-connections/*; do
        [ -f "$f" ] && r "boot_connection=$(sha256sum < "$f" | cut -d' ' -f1) ${f##*/}"
    done
    umount /mnt/boot
else
    r "error=cannot mount resin-boot (${boot:-not found})"
fi

data=$(blkid -c /dev/null -L resin-data)
if [ -n "$data" ] && mount -t ext4 -o ro "$data" /mnt/data; then
    backup=/mnt/data/backup.tgz
    if [ -f "$backup" ]; then
        r "backup=yes"
        r "backup_size=$(stat -c %s "$backup")"
        r "backup_sha256=$(sha256sum < "$backup" | cut -d' ' -f1)"
        tar tzvf "$backup" > /tmp/backup.list 2>&1 || r "error=tar tzvf backup.tgz failed"
        while IFS= read -r line; do r "backup_entry=$line"; done < /tmp/backup.list
        mkdir -p /tmp/backup
        if tar xzf "$backup" -C /tmp/backup; then
            (cd /tmp/backup && find . -type f | sort) > /tmp/backup.files
            while IFS= read -r f; do
                r "backup_file_sha256=$(sha256sum < "/tmp/backup/$f" | cut -d' ' -f1) ${f#./}"
            done < /tmp/backup.files
        else
            r "error=cannot extract backup.tgz"
        fi
    else
        r "backup=no"
    fi
    r "data_free_kib=$(df -k /mnt/data | awk 'NR == 2 { print $4 }')"
    umount /mnt/data
else
    r "error=cannot mount resin-data (${data:-not found})"
fi
r end
sync
poweroff -f
sleep 5
echo o > /proc/sysrq-trigger
"""


def _os_release() -> bytes:
    return synthetic._os_release(INNER_NAME)


def _build_resinos(path: Path, kit: BootKit, work: Path) -> None:
    parts = synthetic._msdos_layout(
        [
            (_RESIN_BOOT_SIZE, _TYPE_FAT16_LBA, True),
            (_RESIN_ROOT_SIZE, _TYPE_LINUX, False),
            (_RESIN_ROOT_SIZE, _TYPE_LINUX, False),
        ],
        [_RESIN_STATE_SIZE, _RESIN_DATA_SIZE],
    )
    by_number = {p.number: p for p in parts}
    synthetic._new_sparse(path, parts[-1].end * SECTOR)
    synthetic._write_table(path, parts, synthetic._fixed_u32(_SEED, "bootable-resinos", "id"))
    _write_boot_code(path, kit)

    grub_cfg = _RESINOS_GRUB_CFG.encode()
    boot_files: dict[str, Path | bytes] = {
        "config.json": RESINOS_CONFIG,
        "bzImage": kit.vmlinuz,
        "initrd": kit.initrd,
        "grub/grub.cfg": grub_cfg,
        "grub.cfg": grub_cfg,
        "EFI/BOOT/grub.cfg": grub_cfg,
        **_grub_files(kit),
    }
    p1 = by_number[1]
    _make_fat(work / "p1", p1.nbytes, "resin-boot", p1.start, boot_files, work)
    synthetic._place(work / "p1", path, p1.offset, p1.nbytes)
    (work / "p1").unlink()

    root_a = _Stage(work / "resin-rootA")
    root_a.userland(kit, kit.resinos_files)
    init = _RESINOS_INIT.replace("@MARKER@", REPORT_MARKER)
    root_a.file("usr/sbin/init", init.replace("@MODULES@", _modules_words(kit)).encode(), 0o755)
    root_a.file("etc/os-release", _os_release())
    root_a.file("etc/hostname", b"resin\n")
    root_a.file("etc/fstab", b"/dev/root / auto defaults 1 1\n")
    root_a.dir("mnt/boot")
    root_a.dir("mnt/data")
    data = _Stage(work / "resin-data")
    data.file("README", b"resin-migrate test resinOS: resin-data\n")
    data.file("docker/.keep", b"")
    for number, label, tree in (
        (2, "resin-rootA", root_a),
        (3, "resin-rootB", None),
        (5, "resin-state", None),
        (6, "resin-data", data),
    ):
        part = by_number[number]
        img = work / f"p{number}"
        synthetic._make_ext4(img, part.nbytes, label, _SEED, tree, work)
        synthetic._place(img, path, part.offset, part.nbytes)
        img.unlink()


def bootable_resinos_image(path: Path) -> None:
    """Write the bootable resinOS stand-in (sparse, 136 MiB apparent, 24 MiB used) to path."""
    kit = boot_kit()
    with tempfile.TemporaryDirectory(prefix="bootable-resinos-") as tmp:
        _build_resinos(Path(path), kit, Path(tmp))


# --------------------------------------------------------------------------- flasher


_FLASHER_INIT = r"""#!/bin/bash
# resin-migrate test flasher: PID 1 on flash-rootA, started by the Debian initramfs after
# it mounted root=LABEL=flash-rootA (read-only). Runs stage 2; if it returns, reboots.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
say() { printf '%s %s\n' "@MARKER@" "$*"; }
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mountpoint -q /run || mount -t tmpfs -o mode=0755 tmpfs /run
mountpoint -q /tmp || mount -t tmpfs -o mode=1777 tmpfs /tmp
say "start kernel=$(uname -r)"
moddir=/usr/lib/modules/$(uname -r)
for m in @MODULES@; do
    name=$(basename "$m" .ko)
    name=${name//-/_}
    [ -d "/sys/module/$name" ] || insmod "$moddir/$m" || say "warning=insmod $m failed"
done
say "stage2 start"
bash /usr/bin/resin-init-flasher
code=$?
say "stage2-exit=$code"
sync
if [ "$code" = 2 ]; then
    # stage 2 failed after its point of no return: a reboot would not come back
    say "staying up"
    while :; do sleep 3600; done
fi
reboot -f
sleep 5
echo b > /proc/sysrq-trigger
"""

#: flash-rootA's /usr/bin/resin-init-flasher before the builder installs the real one.
_PLACEHOLDER_STAGE2 = b"""#!/bin/bash
# Placeholder: the builder (invoke build-flasher) installs runtime/resin-init-flasher here.
echo "resin-init-flasher: placeholder of the test flasher; nothing to do" >&2
exit 1
"""


def _build_flasher(path: Path, kit: BootKit, inner: Path, work: Path) -> None:
    root_a = _Stage(work / "flash-rootA")
    root_a.userland(kit, kit.flasher_files)
    init = _FLASHER_INIT.replace("@MARKER@", INIT_MARKER)
    root_a.file("usr/sbin/init", init.replace("@MODULES@", _modules_words(kit)).encode(), 0o755)
    root_a.file("usr/bin/resin-init-flasher", _PLACEHOLDER_STAGE2, 0o755)
    root_a.file("etc/resin-init-flasher.conf", synthetic._flasher_conf(synthetic.FlasherSpec()))
    root_a.file("etc/os-release", _os_release())
    root_a.file("etc/hostname", b"resin-flasher\n")
    run(["cp", "--sparse=always", inner, root_a.path(f"opt/{INNER_NAME}", 0o644)])
    raw = root_a.apparent_size()
    root_a_size = synthetic._round_up(int(raw * _ROOTA_FREE_FACTOR) + _ROOTA_OVERHEAD, ALIGN)

    parts = synthetic._msdos_layout(
        [
            (_FLASH_BOOT_SIZE, _TYPE_FAT16_LBA, True),
            (root_a_size, _TYPE_LINUX, False),
            (_FLASH_ROOTB_SIZE, _TYPE_LINUX, False),
        ],
        [_FLASH_STATE_SIZE, _FLASH_DATA_SIZE],
    )
    by_number = {p.number: p for p in parts}
    synthetic._new_sparse(path, parts[-1].end * SECTOR)
    synthetic._write_table(path, parts, synthetic._fixed_u32(_SEED, "bootable-flasher", "id"))
    _write_boot_code(path, kit)

    grub_cfg = _FLASHER_GRUB_CFG.encode()
    boot_files: dict[str, Path | bytes] = {
        "config.json": FLASHER_CONFIG,
        "resin-image-flasher": b"",
        "vmlinuz": kit.vmlinuz,
        "initrd": kit.initrd,
        "grub.cfg": grub_cfg,
        "EFI/BOOT/grub.cfg": grub_cfg,
        "grub.cfg_internal": _RESINOS_GRUB_CFG.encode(),
        "grub/grub.cfg": _FLASHER_OWN_GRUB_CFG.encode(),
        "splash/resin-logo.png": synthetic._png(_SEED, "flasher", "splash"),
        **_grub_files(kit),
    }
    p1 = by_number[1]
    _make_fat(work / "p1", p1.nbytes, "flash-boot", p1.start, boot_files, work)
    synthetic._place(work / "p1", path, p1.offset, p1.nbytes)
    (work / "p1").unlink()

    for number, label, tree in ((2, "flash-rootA", root_a), (3, "flash-rootB", None)):
        part = by_number[number]
        img = work / f"p{number}"
        synthetic._make_ext4(img, part.nbytes, label, _SEED, tree, work)
        synthetic._place(img, path, part.offset, part.nbytes)
        img.unlink()
    # 5 flash-state and 6 flash-data stay unformatted, as in a real flasher


def bootable_flasher_image(path: Path, inner: Path | None = None) -> None:
    """Write the bootable flasher (sparse) to path; its flash-rootA holds inner (default: a
    fresh bootable_resinos_image) as /opt/resin-image-genericx86-64.resinos-img."""
    kit = boot_kit()
    with tempfile.TemporaryDirectory(prefix="bootable-flasher-") as tmp:
        work = Path(tmp)
        if inner is None:
            inner = work / "inner.img"
            _build_resinos(inner, kit, work / "inner-work")
        _build_flasher(Path(path), kit, Path(inner), work)


# --------------------------------------------------------------------------- cache


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    directory = cache_dir()
    final = directory / f"{name}-{bootimages_key()}.img"
    if final.exists():
        return final
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        started = time.monotonic()
        build(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
        log.info("%s built in %.0f s", final.name, time.monotonic() - started)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def cached_bootable_resinos() -> Path:
    """The bootable resinOS stand-in, built once into cache_dir(). Never modify it."""
    return _cached("bootable-resinos", bootable_resinos_image)


def cached_bootable_flasher() -> Path:
    """The bootable flasher (holding cached_bootable_resinos()), built once into
    cache_dir(). Never modify it: boot or edit a copy (sparse_copy)."""
    inner = cached_bootable_resinos()
    return _cached("bootable-flasher", lambda p: bootable_flasher_image(p, inner))


def is_cached() -> bool:
    """True when both images are cached for this key: the tests need no root then."""
    key = bootimages_key()
    return all((cache_dir() / f"{n}-{key}.img").exists()
               for n in ("bootable-resinos", "bootable-flasher"))


# --------------------------------------------------------------------------- editing


def sparse_copy(src: Path, dst: Path) -> Path:
    run(["cp", "--sparse=always", src, dst])
    return dst


def partition_offsets(image: Path) -> dict[int, tuple[int, int]]:
    """{partition number: (byte offset, byte size)} from the image's msdos table."""
    out = run(["sfdisk", "--json", image]).stdout
    table = json.loads(out)["partitiontable"]
    result = {}
    for part in table["partitions"]:
        number = int(re.search(r"(\d+)$", part["node"]).group(1))  # type: ignore[union-attr]
        result[number] = (part["start"] * SECTOR, part["size"] * SECTOR)
    return result


def replace_in_ext4(image: Path, number: int, target: str, content: bytes,
                    mode: int = 0o755) -> None:
    """Replace the file target in the ext4 partition number of a disk image with content
    (root-owned, mode), rootless: debugfs `rm` + `write` at the partition's offset."""
    offset, _ = partition_offsets(image)[number]
    with tempfile.TemporaryDirectory(prefix="replace-ext4-") as tmp:
        src = Path(tmp) / "content"
        src.write_bytes(content)
        q = '"' + target.replace('"', '\\"') + '"'
        cmds = Path(tmp) / "cmds"
        cmds.write_text(
            f"rm {q}\nwrite {src} {q}\nsif {q} mode 0{0o100000 | mode:o}\n"
            f"sif {q} uid 0\nsif {q} gid 0\n"
        )
        device = f"{image}?offset={offset}"
        proc = run(["debugfs", "-w", "-f", cmds, device])
        errors = [ln for ln in proc.stderr.splitlines()
                  if ln.strip() and not ln.startswith("debugfs ")]
        if errors:
            raise CommandError(["debugfs", "-w", "-f", str(cmds), device], 0, "\n".join(errors))
        check = run(["debugfs", "-R", f"cat {q}", device]).stdout
        if check.encode() != content:
            raise RigError(f"{image}: {target} reads back different after debugfs write")


# --------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class ResinosReport:
    """The RESINOS-REPORT lines of a serial log: key -> values, in order."""

    values: dict[str, list[str]]
    started: bool
    complete: bool  # the `end` line was seen

    def first(self, key: str) -> str | None:
        found = self.values.get(key)
        return found[0] if found else None

    def all(self, key: str) -> list[str]:
        return list(self.values.get(key, []))

    @property
    def labels(self) -> list[str]:
        """The labels blkid saw (label=<label> <device> lines)."""
        return sorted(v.split()[0] for v in self.all("label"))


_REPORT_LINE = re.compile(rf"{REPORT_MARKER} ([A-Za-z0-9_]+)(?:=(.*))?$")


def parse_report(console: str) -> ResinosReport:
    """Read the resinOS stand-in's report out of a serial log (the last run in it)."""
    values: dict[str, list[str]] = {}
    started = complete = False
    for line in console.replace("\r", "").split("\n"):
        m = _REPORT_LINE.search(line)
        if not m:
            continue
        key, value = m.group(1), m.group(2)
        if value is None:
            if key == "start":
                values, started, complete = {}, True, False
            elif key == "end":
                complete = True
            continue
        values.setdefault(key, []).append(value)
    return ResinosReport(values=values, started=started, complete=complete)


# --------------------------------------------------------------------------- boot


QEMU = "qemu-system-x86_64"
_KILL_GRACE = 5.0


@dataclasses.dataclass(frozen=True)
class BootResult:
    console: str  # serial ttyS0 (SeaBIOS, GRUB, kernel, init), CRLF -> LF
    seconds: float
    timed_out: bool
    marker_seen: bool  # `until` was found (QEMU was then stopped)
    returncode: int | None  # QEMU's; None when it was stopped


def _opt(value: str | os.PathLike[str]) -> str:
    return os.fspath(value).replace(",", ",,")


def qemu_boot_argv(
    disks: Sequence[Path],
    console_log: Path,
    *,
    memory_mib: int = 1024,
    reboot: bool = False,
    snapshot: bool = False,
) -> list[str]:
    """QEMU booting disks[0] by legacy BIOS (SeaBIOS), IDE disks, serial to a file."""
    argv = [
        QEMU, "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", "pc", "-accel", "tcg,thread=multi", "-cpu", "qemu64", "-smp", "2",
        "-m", str(memory_mib), "-rtc", "base=utc", "-nic", "none", "-boot", "order=c",
        "-serial", f"file:{console_log}",
    ]
    if not reboot:
        argv.append("-no-reboot")
    for disk in disks:
        drive = f"file={_opt(disk)},format=raw,if=ide,cache=unsafe"
        argv += ["-drive", drive + (",snapshot=on" if snapshot else "")]
    return argv


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
    except FileNotFoundError:
        return ""


def boot_disk(
    disk: Path,
    *,
    extra_disks: Sequence[Path] = (),
    timeout: float = 300,
    until: str | None = None,
    reboot: bool = False,
    snapshot: bool = False,
    memory_mib: int = 1024,
    console_log: Path | None = None,
) -> BootResult:
    """Boot disk by BIOS in QEMU (TCG) and return the serial log.

    The run ends when the guest powers off (or reboots: -no-reboot, unless reboot=True),
    when `until` appears in the serial log (QEMU is then stopped a second later), or after
    timeout seconds. The disk is written (cache=unsafe): pass a copy, or snapshot=True.
    console_log keeps the serial log at that path (default: a temporary file)."""
    qemu = shutil.which(QEMU, path=base_env()["PATH"])
    if qemu is None:
        raise RigError(f"no {QEMU} on this host (apt-get install qemu-system-x86)")
    with tempfile.TemporaryDirectory(prefix="resin-boot-") as tmp:
        log_path = Path(console_log) if console_log else Path(tmp) / "console.log"
        log_path.unlink(missing_ok=True)
        argv = qemu_boot_argv([Path(disk), *map(Path, extra_disks)], log_path,
                              memory_mib=memory_mib, reboot=reboot, snapshot=snapshot)
        argv[0] = qemu
        env = base_env()
        env["TMPDIR"] = tmp
        log.debug("boot: %s", shlex.join(argv))
        started = time.monotonic()
        timed_out = marker_seen = False
        with open(Path(tmp) / "qemu.log", "wb") as qemu_out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qemu_out,
                                    stderr=subprocess.STDOUT, env=env)
            try:
                while proc.poll() is None:
                    if time.monotonic() - started > timeout:
                        timed_out = True
                        break
                    if until is not None and until in _read(log_path):
                        marker_seen = True
                        time.sleep(1.0)
                        break
                    time.sleep(0.25)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=_KILL_GRACE)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                    returncode = None
                else:
                    returncode = proc.returncode
        seconds = time.monotonic() - started
        console = _read(log_path)
        if returncode not in (None, 0):
            raise RigError(f"{QEMU} exited with {returncode}: "
                           f"{_read(Path(tmp) / 'qemu.log').strip()}\n{console[-3000:]}")
        return BootResult(console=console, seconds=seconds, timed_out=timed_out,
                          marker_seen=marker_seen, returncode=returncode)
