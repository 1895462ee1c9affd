"""Bootable stand-ins for the flasher and the resinOS image inside it: the synthetic images of
a release row (tests.synthetic, tests.releases) with what QEMU needs to boot them by BIOS.

Both are made by the same builders as the rootless matrix, from the same rows; the rig adds
(synthetic.Extras):

- a real GRUB (boot.img, a core.img by grub-mkimage with the modules it needs embedded,
  prefix ``(hd0,msdos1)/grub``, and every module in ``/grub/i386-pc``);
- the Debian kernel of ``tests.rig.rootfs`` where the row keeps the flasher's kernel
  (``/boot/bzImage`` in flash-rootA from 2.21, ``/vmlinuz`` on flash-boot before), with an
  initramfs made by that rootfs's own ``mkinitramfs`` (``MODULES=list``: the disk drivers and
  ext4). The real kernels bundle their initramfs, so the row's GRUB entries get an
  ``initrd`` line here that the real ones do not have. For rows with the initramfs migrator
  (meta-balena v2.113.0 on) the initramfs has a stand-in of it (``_MIGRATOR``): booted with
  ``flasher`` from the only disk, with the flag file in the rootfs copy ``/flash-boot/``, it
  takes over (prints ``MIGRATOR_MARKER taking over`` and powers off: it would write the raw
  image it found), or, when the raw image is not under its original name, fails and the
  machine reboots, as balena's kernel does (``CONFIG_PANIC_TIMEOUT=1``);
- in flash-rootA, systemd from the rootfs (PID 1, journald, udevd, the targets) running the
  row's own units (``releases.flasher_units``): ``mnt-boot.mount``, ``temp-conf.service``,
  ``resin-device-register.service`` (which retries an API it never reaches),
  ``resin-init-flasher.service``; stand-ins of the units they require
  (balena-device-uuid, os-config-devicekey); a rig unit that loads the loop and FAT modules
  (balena's kernels have them; udev would load them with kmod's indexes, which the rig
  leaves out); the tools stage 2 runs (bash, util-linux, coreutils, e2fsprogs' pieces, gzip,
  zstd) with their libraries, busybox for the rest. flash-boot also carries the fleet's proxy
  configuration (``system-proxy/redsocks.conf``) so that the end-to-end run can look for it
  on the migrated disk;
- in the resinOS image: busybox, util-linux blkid and an ``/sbin/init`` that reports what
  the disk holds on ttyS0 (``RESINOS-REPORT key=value`` lines: labels, config.json, the files
  resin-boot got, the backup, resin-data's free space), then powers off; ``parse_report()``
  reads the report back. Its /grub/grub.cfg (also flash-boot's grub.cfg_internal) boots
  /boot/bzImage from resin-rootA with a serial console.

The pieces taken from the rootfs (kernel, initramfs, GRUB, tools, systemd, modules: the *boot
kit*) are made once in a chroot of the unpacked rootfs, which needs root, and cached in
``cache_dir()/bootkit-<key>/``; busybox comes from Debian's ``busybox-static`` package. The
images are cached per row, keyed by this file, the synthetic builders and the rootfs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from tests import imaging, synthetic
from tests.imaging import ALIGN, EPOCH, SECTOR, Tree, cache_dir
from tests.releases import RELEASES, Release
from tests.rig import RigError, run
from tests.rig.legacy import BACKUP_VOLUME
from tests.rig.rootfs import debian_rootfs, rootfs_key, unpack

__all__ = [
    "REPORT_MARKER",
    "MIGRATOR_MARKER",
    "FLASHER_RELEASE",
    "OLDER_RELEASE",
    "PROXY_CONF",
    "ResinosReport",
    "BootKit",
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
    "sparse_copy",
]

log = logging.getLogger(__name__)

REPORT_MARKER = "RESINOS-REPORT"
MIGRATOR_MARKER = "rig-migrator:"
#: The release rows the rig boots: a current one with the initramfs migrator, and an older
#: one (GRUB variables, resin names, no migrator).
FLASHER_RELEASE = RELEASES["2.113"]
OLDER_RELEASE = RELEASES["2.51"]
#: The fleet's proxy configuration on the rig flasher's flash-boot.
PROXY_CONF = b"base {\n log_debug = off;\n daemon = on;\n}\nredsocks {\n local_ip = 127.0.0.1;\n" \
             b" local_port = 12345;\n ip = 192.0.2.1;\n port = 3128;\n type = http-connect;\n}\n"

# --------------------------------------------------------------------------- the boot kit

#: Disk drivers and the root filesystem in the initramfs (its hooks add their dependencies
#: and a few base modules): IDE (QEMU's default disk), AHCI, virtio, and ext4.
INITRAMFS_MODULES = ("ata_piix", "ahci", "sd_mod", "virtio_pci", "virtio_blk", "ext4")
#: Loaded from the root filesystem: loop devices (stage 2 reaches resin-boot and resin-data
#: through them) and FAT (this kernel's defaults: codepage 437, iocharset ascii; utf8 and
#: iso8859-1 for mounts that ask for them).
ROOT_MODULES = ("loop", "vfat", "nls_cp437", "nls_ascii", "nls_utf8", "nls_iso8859-1")
#: Embedded in core.img, so GRUB needs nothing from disk but its grub.cfg.
GRUB_MODULES = (
    "biosdisk", "part_msdos", "fat", "ext2", "normal", "linux", "search", "search_label",
    "search_fs_uuid", "configfile", "echo", "serial", "terminal", "test", "sleep", "minicmd",
)
GRUB_PREFIX = "(hd0,msdos1)/grub"

#: What stage 2 runs (its `need` lines and the rest of runtime/resin-migrate-stage2), from
#: the rootfs with their libraries; busybox provides everything else.
FLASHER_TOOLS = (
    "bash", "blkid", "losetup", "mount", "umount", "mountpoint", "blockdev", "findmnt",
    "lsblk", "dd", "sha256sum", "head", "tail", "stat", "od", "tr", "sed", "cut", "date",
    "readlink", "basename", "dirname", "cp", "mkdir", "rm", "sync", "cat", "ls", "ln",
    "mv", "uname", "sleep", "wc", "tee", "touch", "chmod", "env", "true", "false", "sort",
    "printf", "echo", "test", "grep", "gzip", "zstd", "systemctl", "journalctl", "udevadm",
)
#: systemd as the flasher's PID 1, from the rootfs (plus udev's rules and helpers).
SYSTEMD_FILES = (
    "/usr/lib/systemd/systemd", "/usr/lib/systemd/systemd-journald",
    "/usr/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-shutdown",
    "/usr/lib/udev/ata_id", "/usr/lib/udev/scsi_id",
)
#: Units of the rootfs's systemd the flasher boots with: the targets (all), and these.
SYSTEMD_UNITS = (
    "tmp.mount",
    "systemd-journald.service", "systemd-journald.socket", "systemd-journald-dev-log.socket",
    "systemd-udevd.service", "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service", "systemd-reboot.service", "systemd-poweroff.service",
    "systemd-halt.service",
)
#: GNU tar (and the gzip it runs) where the kit finds them, beside busybox's tar: the restore
#: is tried with both
RESINOS_TOOLS = ("blkid", "tar", "gzip")

_KIT_VERSION = 2
_CHROOT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def kit_key() -> str:
    """Key of the boot kit: this file and the rootfs it is taken from."""
    return imaging.key(Path(__file__), rootfs_key())


def bootimages_key() -> str:
    """Key of the cached images: the kit's, and the synthetic builders whose rows and
    pieces the images are made of."""
    return imaging.key(kit_key(), *synthetic.SOURCES)


@dataclasses.dataclass(frozen=True)
class BootKit:
    """The pieces taken from the rig's rootfs, in a cached directory."""

    root: Path
    kernel_version: str
    modules: tuple[str, ...]  # below usr/lib/modules/<version>/, in load order
    resinos_files: tuple[str, ...]  # below files/, relative, in copy order
    flasher_files: tuple[str, ...]
    units: tuple[str, ...]  # below files/usr/lib/systemd/system/ (links included)
    applets: tuple[str, ...]  # busybox --list-full

    @property
    def vmlinuz(self) -> Path:
        return self.root / "vmlinuz"

    def initrd(self, migrator: bool) -> Path:
        """The initramfs: with the migrator stand-in for the rows that have one."""
        return self.root / ("initrd-migrator.img" if migrator else "initrd.img")

    @property
    def grub(self) -> synthetic.Grub:
        directory = self.root / "grub"
        modules = {f"grub/i386-pc/{p.name}": p for p in sorted((directory / "i386-pc").iterdir())}
        return synthetic.Grub((directory / "boot.img").read_bytes(),
                              (directory / "core.img").read_bytes(), modules)

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
        run(["apt-get", "download", "-q", "busybox-static"], cwd=fetch, timeout=300)
    except imaging.CommandError as exc:
        log.warning("apt-get download busybox-static failed: %s", exc)
        return None
    debs = sorted(fetch.glob("busybox-static_*.deb"))
    if not debs:
        return None
    final = directory / debs[-1].name
    tmp = directory / f".{final.name}.{os.getpid()}.tmp"
    shutil.copyfile(debs[-1], tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, final)
    return final


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
        status = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", "busybox-static"],
                                capture_output=True, text=True, check=False).stdout
        binary = Path("/bin/busybox")
        if not (status.endswith("installed") and binary.is_file()):
            raise RigError(
                "no busybox-static: `apt-get download busybox-static` failed (`apt-get "
                "update` first?) and the package is not installed on this host (apt-get "
                f"install busybox-static), nor is its .deb in {cache_dir()}")
    shutil.copyfile(binary, dest)
    os.chmod(dest, 0o755)


# The initramfs migrator's stand-in (initramfs-tools local-bottom: the root filesystem is
# mounted at $rootmnt). What it reads and does follows meta-balena's
# recipes-core/initrdscripts/files/migrate (v2.113.0, c59a7090f): with `flasher` on the
# kernel line and the flag file in the rootfs copy of flash-boot, booted from the only
# disk, it looks for the raw image under its original name; found, it would write it over
# the disk; not found, it fails and balena's kernel reboots (CONFIG_PANIC_TIMEOUT=1).
# Its messages go to /dev/kmsg at KERN_ERR, which `quiet` does not hide. klibc sh.
_MIGRATOR = r"""#!/bin/sh
PREREQ=""
prereqs() { echo "$PREREQ"; }
case "$1" in prereqs) prereqs; exit 0 ;; esac
say() { echo "<3>@MARKER@ $*" > /dev/kmsg; }
case " $(cat /proc/cmdline) " in *" flasher "*) ;; *) exit 0 ;; esac
flag=
for name in balena-image-flasher resin-image-flasher; do
    [ -f "${rootmnt}/flash-boot/$name" ] && flag=$name
done
if [ -z "$flag" ]; then
    say "not enabled: no /flash-boot/balena-image-flasher in the root filesystem"
    exit 0
fi
disks=0
for dev in /sys/block/*; do
    case "${dev##*/}" in loop*|ram*|zram*|sr*) ;; *) disks=$((disks + 1)) ;; esac
done
if [ "$disks" != 1 ]; then
    say "not migrating: $disks disks"
    exit 0
fi
BALENA_IMAGE= RESIN_IMAGE=
. "${rootmnt}/etc/resin-init-flasher.conf"
image=${BALENA_IMAGE:-$RESIN_IMAGE}
if [ -f "${rootmnt}/opt/$image" ]; then
    say "taking over: would write /opt/$image over the disk (no checks, no backup)"
    sync
    poweroff -f
fi
say "FAIL: no $image found in the root filesystem; rebooting (CONFIG_PANIC_TIMEOUT=1)"
sync
echo b > /proc/sysrq-trigger
sleep 5
"""

_INITRAMFS_SETTINGS = {"MODULES": "list", "BUSYBOX": "n", "COMPRESS": "zstd", "KEYMAP": "n"}


def _make_initramfs(tree: Path, version: str, out: Path, migrator: bool) -> None:
    """A small initramfs made by the rootfs's own mkinitramfs (MODULES=list); with the
    migrator stand-in in local-bottom when asked."""
    conf = tree / "tmp" / "resin-initramfs"
    if conf.exists():
        shutil.rmtree(conf)
    shutil.copytree(tree / "etc" / "initramfs-tools", conf, symlinks=True)
    text = (conf / "initramfs.conf").read_text()
    for key, value in _INITRAMFS_SETTINGS.items():
        text, n = re.subn(rf"(?m)^{key}=.*$", f"{key}={value}", text)
        if not n:
            text += f"{key}={value}\n"
    (conf / "initramfs.conf").write_text(text)
    (conf / "modules").write_text("".join(f"{m}\n" for m in INITRAMFS_MODULES))
    if migrator:
        script = conf / "scripts" / "local-bottom" / "balena-migrate"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(_MIGRATOR.replace("@MARKER@", MIGRATOR_MARKER))
        script.chmod(0o755)
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


def _copy_units(tree: Path, files: Path) -> list[str]:
    """The targets and SYSTEMD_UNITS of the rootfs's systemd, and the .wants links among
    them, into files/usr/lib/systemd/system/; returns what was copied (relative)."""
    source = tree / "usr/lib/systemd/system"
    dest = files / "usr/lib/systemd/system"
    dest.mkdir(parents=True, exist_ok=True)
    names = sorted({p.name for p in source.glob("*.target")} | set(SYSTEMD_UNITS))
    tmp_mount = tree / "usr/share/systemd/tmp.mount"  # Debian ships it unlisted
    copied = []
    for name in names:
        src = tmp_mount if name == "tmp.mount" else source / name
        if not src.exists():
            raise RigError(f"the rootfs's systemd has no {name}")
        target = dest / name
        if src.is_symlink():
            os.symlink(os.readlink(src), target)
        else:
            shutil.copyfile(src, target)
        copied.append(name)
    for wants in sorted(source.glob("*.target.wants/*")):
        if wants.name in names and wants.parent.name[: -len(".wants")] in names:
            link = dest / wants.parent.name / wants.name
            link.parent.mkdir(exist_ok=True)
            os.symlink(os.readlink(wants), link)
            copied.append(f"{wants.parent.name}/{wants.name}")
    return copied


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
        _make_initramfs(tree, version, dest / "initrd.img", migrator=False)
        _make_initramfs(tree, version, dest / "initrd-migrator.img", migrator=True)
        _make_grub(tree, dest / "grub")

        files = dest / "files"
        files.mkdir()
        lists: dict[str, list[str]] = {}
        for name, tools, extra in (("resinos", RESINOS_TOOLS, ()),
                                   ("flasher", FLASHER_TOOLS, SYSTEMD_FILES)):
            binaries = [*_resolve_tools(tree, tools), *extra]
            copied: list[str] = []
            for path in [*binaries, *_libraries(tree, binaries)]:
                _copy_in(tree, path, files, copied)
            lists[name] = copied
        rules = files / "usr/lib/udev/rules.d"
        shutil.copytree(tree / "usr/lib/udev/rules.d", rules, symlinks=True)
        lists["flasher"] += [f"usr/lib/udev/rules.d/{p.name}" for p in sorted(rules.iterdir())]
        units = _copy_units(tree, files)

        moddir = tree / "usr" / "lib" / "modules" / version
        order = _module_order((moddir / "modules.dep").read_text(), ROOT_MODULES)
        out_moddir = files / "usr" / "lib" / "modules" / version
        for rel in order:
            (out_moddir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(moddir / rel, out_moddir / rel)

        _get_busybox(dest / "busybox", dest)
        applets = run([dest / "busybox", "--list-full"]).stdout.split()
        if "sbin/reboot" not in applets or "bin/sh" not in applets:
            raise RigError("this busybox lacks reboot or sh")
        kit = {"kit_version": _KIT_VERSION, "kernel_version": version, "modules": order,
               "resinos_files": lists["resinos"], "flasher_files": lists["flasher"],
               "units": units, "applets": applets}
        (dest / "kit.json").write_text(json.dumps(kit, indent=1) + "\n")
    finally:
        shutil.rmtree(tree, ignore_errors=True)
        for leftover in ("apt", "busybox-deb"):
            shutil.rmtree(dest / leftover, ignore_errors=True)


def boot_kit() -> BootKit:
    """The cached boot kit (made on first use, as root: unpack the rootfs, mkinitramfs twice
    and grub-mkimage in a chroot, ldd; about half a minute once the rootfs tarball exists)."""
    name = f"bootkit-{kit_key()}"
    if not (cache_dir() / name).is_dir() and os.geteuid() != 0:
        raise RigError("making the boot kit needs root (the rootfs is unpacked with its "
                       "owners and used as a chroot); later runs reuse the cached kit")
    root = imaging.cached(name, _fill_kit, directory=True)
    data = json.loads((root / "kit.json").read_text())
    return BootKit(root=root, kernel_version=data["kernel_version"],
                   modules=tuple(data["modules"]), resinos_files=tuple(data["resinos_files"]),
                   flasher_files=tuple(data["flasher_files"]), units=tuple(data["units"]),
                   applets=tuple(data["applets"]))


# --------------------------------------------------------------------------- userland


def _userland(tree: Tree, kit: BootKit, entries: Iterable[str]) -> None:
    """Merged /usr (bin, sbin, lib, lib64 -> usr/...), the kit's entries, the root
    modules, busybox with a link for every applet no copied tool provides."""
    for top in ("bin", "sbin", "lib", "lib64"):
        tree.symlink(top, f"usr/{top}")
    for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64"):
        tree.dir(d)
    for rel in entries:
        src = kit.files / rel
        if src.is_symlink():
            tree.symlink(rel, os.readlink(src))
        else:
            tree.copy(rel, src)
    base = f"usr/lib/modules/{kit.kernel_version}"
    for rel in kit.modules:
        tree.copy(f"{base}/{rel}", kit.files / base / rel, 0o644)
    tree.copy("usr/bin/busybox", kit.busybox, 0o755)
    for applet in kit.applets:
        name = os.path.basename(applet)
        if name in ("busybox", "init", "linuxrc") or "/" not in applet:
            continue
        if tree.exists(f"usr/bin/{name}") or tree.exists(f"usr/sbin/{name}"):
            continue
        if "sbin/" in applet:
            tree.symlink(f"usr/sbin/{name}", "../bin/busybox")
        else:
            tree.symlink(f"usr/bin/{name}", "busybox")
    for d in ("proc", "sys", "dev", "run", "tmp", "mnt", "root", "etc", "var", "opt"):
        tree.dir(d)


def _modules_words(kit: BootKit) -> str:
    return " ".join(kit.modules)


_GRUB_SERIAL = """\
serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1
terminal_input serial console
terminal_output serial console
"""


def resinos_grub_cfg(release: Release) -> str:
    """The stand-in's /grub/grub.cfg (and the rig flasher's grub.cfg_internal): the kernel
    where the row keeps it (resin-rootA's /boot from 2.21, resin-boot's /vmlinuz before),
    as balenaOS boots it, on a serial console."""
    if release.kernel_in_rootfs:
        where, kernel, initrd = "resin-rootA", "/boot/bzImage", "/boot/initrd"
    else:
        where, kernel, initrd = "resin-boot", "/vmlinuz", "/initrd"
    return (f"{_GRUB_SERIAL}set default=boot\nset timeout=0\n\n"
            "menuentry 'resinOS (resin-migrate test stand-in)' --id boot {\n"
            f"  search --no-floppy --set=root --label {where}\n"
            f"  linux {kernel} root=LABEL=resin-rootA rootwait console=ttyS0,115200\n"
            f"  initrd {initrd}\n}}\n")


# --------------------------------------------------------------------------- resinOS

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
        r "config_json=$(tr -d '\n' < /mnt/boot/config.json)"
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
    for dir in splash system-proxy dispatcher.d; do
        for f in /mnt/boot/$dir/*; do
            [ -f "$f" ] && r "boot_file=$(sha256sum < "$f" | cut -d' ' -f1) $dir/${f##*/}"
        done
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
        # restored as the balena Supervisor restores it (src/lib/migration.ts): with both
        # of its commands (8.7.0-10.3.1 name the member ".", later ones none), with busybox's
        # tar and GNU tar where present (busybox finds "." only if the archive has "./"),
        # into the directory of the app's volumes, whose every top-level entry must be a
        # directory named after a volume; then each volume's files
        tars="busybox"
        if tar --version 2>/dev/null | grep -q GNU; then tars="$tars gnu"; fi
        for form in $(for t in $tars; do printf '%s-old %s-new ' "$t" "$t"; done); do
            dir=/tmp/volumes-$form
            mkdir -p "$dir"
            case $form in *-old) set -- . ;; *) set -- ;; esac
            case $form in
                busybox-*) tar_of() { busybox tar "$@"; } ;;
                *) tar_of() { tar "$@"; } ;;
            esac
            if ! tar_of -xzf "$backup" -C "$dir" "$@" 2> /tmp/tar.err; then
                why=$(tr '\n' ' ' < /tmp/tar.err)
                r "restore_error=the $form form (tar -xzf backup.tgz -C DIR $*) failed: $why"
                continue
            fi
            for entry in "$dir"/* "$dir"/.[!.]*; do
                [ -e "$entry" ] || [ -L "$entry" ] || continue
                name=${entry##*/}
                if [ -L "$entry" ] || [ ! -d "$entry" ]; then
                    r "restore_error=top-level $name is not a directory ($form form)"
                fi
                case " @VOLUMES@ " in
                    *" $name "*) ;;
                    *) r "restore_error=top-level $name is not a volume of the app ($form form)" ;;
                esac
            done
            (cd "$dir" && find . | sort) > "/tmp/volumes-$form.tree"
            if [ ! -s /tmp/volumes-busybox-old.tree ] ||
                ! cmp -s /tmp/volumes-busybox-old.tree "/tmp/volumes-$form.tree"; then
                r "restore_error=the $form form restores another tree than busybox-old"
            fi
        done
        r "restore=$tars"
        (cd /tmp/volumes-busybox-old && find . -type f | sort) > /tmp/volume.files
        while IFS= read -r f; do
            sum=$(sha256sum < "/tmp/volumes-busybox-old/$f" | cut -d' ' -f1)
            r "volume_file_sha256=$sum ${f#./}"
        done < /tmp/volume.files
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


def _resinos_extras(kit: BootKit, release: Release) -> synthetic.Extras:
    def rootfs(tree: Tree) -> None:
        _userland(tree, kit, kit.resinos_files)
        init = _RESINOS_INIT.replace("@MARKER@", REPORT_MARKER).replace(
            "@VOLUMES@", BACKUP_VOLUME)
        tree.file("usr/sbin/init", init.replace("@MODULES@", _modules_words(kit)).encode(),
                  0o755)
        tree.dir("mnt/boot")
        tree.dir("mnt/data")

    return synthetic.Extras(grub=kit.grub, kernel=kit.vmlinuz,
                            initrd=kit.initrd(release.migrator),
                            image_cfg=resinos_grub_cfg(release), rootfs=rootfs)


def bootable_resinos_image(path: Path, release: Release = FLASHER_RELEASE) -> None:
    """Write the bootable resinOS stand-in of a release row (sparse) to path."""
    kit = boot_kit()
    synthetic.build_resinos_image(Path(path), release, extras=_resinos_extras(kit, release))


# --------------------------------------------------------------------------- flasher

#: The rig's own units in the flasher: the kernel modules balena's kernels carry, and the
#: units the registration requires (the real ones make the device's UUID and API key).
_RIG_MODULES_UNIT = """\
[Unit]
Description=resin-migrate rig: the loop and FAT modules balena's kernel has
DefaultDependencies=no
Before=sysinit.target systemd-udev-trigger.service local-fs-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/rig-load-modules

[Install]
WantedBy=sysinit.target
"""

_RIG_LOAD_MODULES = """\
#!/bin/sh
# resin-migrate rig: load the modules the stand-in flasher's kernel lacks
moddir=/usr/lib/modules/$(uname -r)
for m in @MODULES@; do
    name=$(basename "$m" .ko | tr - _)
    [ -d "/sys/module/$name" ] || insmod "$moddir/$m" || echo "rig: insmod $m failed" >&2
done
"""

_RIG_STAND_IN_UNIT = """\
[Unit]
Description=resin-migrate rig: stand-in for balena's {name}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/echo "stand-in {name}: done"
"""

_PASSWD = ("root:x:0:0:root:/home/root:/bin/sh\n"
           "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
_GROUP_NAMES = ("root", "tty", "disk", "kmem", "dialout", "cdrom", "tape", "audio", "video",
                "input", "kvm", "render", "sgx", "utmp", "systemd-journal", "nogroup")


def _flasher_extras(kit: BootKit, release: Release) -> synthetic.Extras:
    def rootfs(tree: Tree) -> None:
        _userland(tree, kit, kit.flasher_files)
        units = "usr/lib/systemd/system"
        for rel in kit.units:
            src = kit.files / units / rel
            if src.is_symlink():
                tree.symlink(f"{units}/{rel}", os.readlink(src))
            else:
                tree.copy(f"{units}/{rel}", src, 0o644)
        tree.symlink("usr/sbin/init", "../lib/systemd/systemd")
        tree.symlink("etc/systemd/system/default.target", f"/{units}/multi-user.target")
        tree.symlink("etc/systemd/system/local-fs.target.wants/tmp.mount", f"/{units}/tmp.mount")
        tree.file(f"{units}/rig-kernel-modules.service", _RIG_MODULES_UNIT.encode())
        tree.symlink("etc/systemd/system/sysinit.target.wants/rig-kernel-modules.service",
                     f"/{units}/rig-kernel-modules.service")
        tree.file("usr/sbin/rig-load-modules",
                  _RIG_LOAD_MODULES.replace("@MODULES@", _modules_words(kit)).encode(), 0o755)
        for name in ("balena-device-uuid.service", "os-config-devicekey.service",
                     "resin-device-uuid.service", "resin-device-api-key.service"):
            tree.file(f"{units}/{name}", _RIG_STAND_IN_UNIT.format(name=name).encode())
        tree.file("etc/machine-id", b"")
        tree.file("etc/passwd", _PASSWD.encode())
        tree.file("etc/group", "".join(f"{name}:x:{gid}:\n" for gid, name in enumerate(
            _GROUP_NAMES[:-1])).encode() + b"nogroup:x:65534:\n")
        tree.file("etc/hostname", b"balena-flasher\n")
        for d in ("mnt/boot", "mnt/boottmp", "mnt/bootorig", "var/log", "home/root"):
            tree.dir(d)

    return synthetic.Extras(grub=kit.grub, kernel=kit.vmlinuz,
                            initrd=kit.initrd(release.migrator),
                            image_cfg=resinos_grub_cfg(release), rootfs=rootfs,
                            boot_files={"system-proxy/redsocks.conf": PROXY_CONF})


def bootable_flasher_image(path: Path, release: Release = FLASHER_RELEASE,
                           inner: Path | None = None) -> None:
    """Write the bootable flasher of a release row (sparse) to path; its flash-rootA holds
    inner (default: the row's cached bootable resinOS stand-in) under the row's name."""
    kit = boot_kit()
    synthetic.build_flasher_image(
        Path(path), synthetic.FlasherSpec(release=release, with_zstd=True),
        inner=inner or cached_bootable_resinos(release), extras=_flasher_extras(kit, release))


# --------------------------------------------------------------------------- cache


def _cached(name: str, release: Release, build) -> Path:
    return imaging.cached(f"{name}-{release.name}-{bootimages_key()}.img", build)


def cached_bootable_resinos(release: Release = FLASHER_RELEASE) -> Path:
    """The bootable resinOS stand-in of a row, built once into cache_dir(). Never modify it."""
    return _cached("bootable-resinos", release, lambda p: bootable_resinos_image(p, release))


def cached_bootable_flasher(release: Release = FLASHER_RELEASE) -> Path:
    """The bootable flasher of a row (holding its resinOS stand-in), built once into
    cache_dir(). Never modify it: boot or edit a copy (sparse_copy)."""
    inner = cached_bootable_resinos(release)
    return _cached("bootable-flasher", release,
                   lambda p: bootable_flasher_image(p, release, inner))


def is_cached(release: Release = FLASHER_RELEASE) -> bool:
    """True when both images of the row are cached: the tests need no root then."""
    key = bootimages_key()
    return all((cache_dir() / f"{n}-{release.name}-{key}.img").exists()
               for n in ("bootable-resinos", "bootable-flasher"))


# --------------------------------------------------------------------------- editing


def sparse_copy(src: Path, dst: Path) -> Path:
    run(["cp", "--sparse=always", src, dst])
    return dst


def partition_offsets(image: Path) -> dict[int, tuple[int, int]]:
    """{partition number: (byte offset, byte size)} from the image's msdos table."""
    table = json.loads(run(["sfdisk", "--json", image]).stdout)["partitiontable"]
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
    device = f"{image}?offset={offset}"
    with tempfile.TemporaryDirectory(prefix="replace-ext4-") as tmp:
        src = Path(tmp) / "content"
        src.write_bytes(content)
        q = '"' + target.replace('"', '\\"') + '"'
        imaging.debugfs(device, [f"rm {q}", f"write {src} {q}",
                                 f"sif {q} mode 0{0o100000 | mode:o}", f"sif {q} uid 0",
                                 f"sif {q} gid 0"], write=True)
        if imaging.debugfs(device, [f"cat {q}"]).encode() != content:
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

    def files(self, key: str) -> dict[str, str]:
        """{name: sha256} of "<sha256> <name>" values (boot_file, boot_connection...)."""
        found = {}
        for value in self.all(key):
            digest, _, name = value.partition(" ")
            found[name] = digest
        return found


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

