"""A Debian bookworm root filesystem for the legacy device, built once with debootstrap
and cached as a tarball.

``debian_rootfs()`` returns the path of ``cache_dir()/rootfs-<key>.tar.zst``: a minbase
bookworm with a kernel, GRUB (i386-pc), systemd and the tools the runtime uses, owned
and moded as installed (numeric owners, xattrs). Unpack it as root with
``tar --numeric-owner --xattrs --xattrs-include='*' -I zstd -xf TARBALL -C DIR``
(``unpack()`` does that).

The key covers the suite, the package list and the source of this module and of the
rig's ``run()``; the mirror is not part of it (any mirror gives the same packages). The
downloaded .debs are kept in ``cache_dir()/debootstrap-<suite>`` (debootstrap's
``--cache-dir``), so a rebuild after a key change does not download again.

Needs root and ``debootstrap`` on the host. The mirror is read from
``/etc/apt/sources.list.d/debian.sources`` (the URIs of the stanza listing the suite),
else ``/etc/apt/sources.list``, else deb.debian.org; ``RESIN_MIGRATE_DEBIAN_MIRROR``
overrides it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from tests import imaging
from tests.imaging import cache_dir, cached
from tests.rig import CommandError, RigError, base_env, run

__all__ = [
    "SUITE",
    "PACKAGES",
    "HOSTNAME",
    "debian_mirror",
    "rootfs_key",
    "debian_rootfs",
    "build_rootfs",
    "unpack",
    "mounts_below",
    "unmount_below",
]

log = logging.getLogger(__name__)

SUITE = "bookworm"
PACKAGES = (
    "linux-image-amd64",
    "grub-pc",
    "systemd-sysv",
    "udev",
    "kmod",
    "python3",
    "util-linux",
    "parted",
    "fdisk",
    "e2fsprogs",
    "dosfstools",
    "zstd",
    "procps",
    "gzip",
    "tar",
    # the fleet scenario reaches the device as a fleet tool does (tests/fleet.py): sshd,
    # started on every boot (the other scenarios give the VM no network), and the ip the
    # runtime reads the live routes with, as every installed Debian has it
    "openssh-server",
    "iproute2",
)
HOSTNAME = "legacy-device"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

#: /etc/default/grub keys set in the rootfs (the rest stays as Debian installs it).
GRUB_DEFAULTS = {
    "GRUB_DEFAULT": "0",
    "GRUB_TIMEOUT": "1",
    "GRUB_CMDLINE_LINUX": '"console=ttyS0,115200"',
    "GRUB_TERMINAL": '"serial console"',
    "GRUB_SERIAL_COMMAND": '"serial --speed=115200 --unit=0 --word=8 --parity=no --stop=1"',
}

_TAR_OPTS = ["--numeric-owner", "--xattrs", "--xattrs-include=*"]
_ZSTD_PACK = "zstd -T0 -3 -q"
_ZSTD_UNPACK = "zstd -d -T0 -q"
_DEBOOTSTRAP_TIMEOUT = 3600


# --------------------------------------------------------------------------- mirror


def _sources_mirror(text: str, suite: str) -> str | None:
    """The first URI of a deb822 stanza of type deb listing suite."""
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        if suite in fields.get("suites", "").split() and fields.get("uris"):
            return fields["uris"].split()[0]
    return None


def _list_mirror(text: str, suite: str) -> str | None:
    """The URI of the first one-line-style `deb URI suite ...` entry."""
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
            return words[1]
    return None


def debian_mirror(suite: str = SUITE) -> str:
    """The Debian mirror to debootstrap from (see the module docstring)."""
    env = os.environ.get("RESIN_MIGRATE_DEBIAN_MIRROR")
    if env:
        return env
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.is_file():
        found = _sources_mirror(sources.read_text(), suite)
        if found:
            return found
    lists = sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    for path in [Path("/etc/apt/sources.list"), *lists]:
        if path.is_file():
            found = _list_mirror(path.read_text(), suite)
            if found:
                return found
    return DEFAULT_MIRROR


# --------------------------------------------------------------------------- mounts


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_below(path: Path) -> list[Path]:
    """Mount points at or below path (from /proc/self/mountinfo), deepest first."""
    root = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = _unescape(line.split()[4])
            if target == root or target.startswith(root.rstrip("/") + "/"):
                found.append(Path(target))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def unmount_below(path: Path) -> None:
    """Unmount everything mounted at or below path: `umount -R`, lazily if busy.

    Raises RigError when something is still mounted afterwards.
    """
    for target in mounts_below(path):
        if target not in mounts_below(path):
            continue  # went with a parent
        try:
            run(["umount", "-R", target])
        except CommandError:
            run(["umount", "-R", "-l", target], ok_codes=(0, 32))
    left = mounts_below(path)
    if left:
        raise RigError(f"still mounted below {path}: {', '.join(map(str, left))}")


def _remove_tree(path: Path) -> None:
    """rm -rf, but never through a mount point (debootstrap mounts /proc, /sys, /dev
    inside its target, and a failed run can leave them)."""
    if not path.exists():
        return
    unmount_below(path)
    shutil.rmtree(path)


# --------------------------------------------------------------------------- build


def rootfs_key(suite: str = SUITE, packages: tuple[str, ...] = PACKAGES) -> str:
    """The tarball's key: what debootstrap is asked for, and this module (its customizing)."""
    return imaging.key(Path(__file__), suite, packages)


def _set_shell_vars(text: str, values: dict[str, str]) -> str:
    """Set KEY=value lines of a shell-style file, replacing (possibly commented) ones."""
    lines = text.splitlines()
    for key, value in values.items():
        new = f"{key}={value}"
        pattern = re.compile(rf"^\s*#?\s*{re.escape(key)}=")
        for i, line in enumerate(lines):
            if pattern.match(line):
                lines[i] = new
                break
        else:
            lines.append(new)
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.unlink(missing_ok=True)  # debootstrap copies some files from the host, modes too
    path.write_text(text)
    os.chmod(path, mode)


def _customize(tree: Path) -> None:
    os.chmod(tree, 0o755)  # mkdtemp made it 0700, and tar records it as "./"
    _write(tree / "etc/hostname", HOSTNAME + "\n")
    _write(
        tree / "etc/hosts",
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n\n"
        "::1\t\tlocalhost ip6-localhost ip6-loopback\n"
        "ff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n",
    )
    _write(tree / "etc/resolv.conf", "")  # debootstrap copied the host's
    default_grub = tree / "etc/default/grub"
    default_grub.write_text(_set_shell_vars(default_grub.read_text(), GRUB_DEFAULTS))
    run(["chroot", tree, "passwd", "-d", "root"])  # root logs in without a password
    # no network in the VM: drop the package cache and lists (debootstrap's --cache-dir
    # keeps the .debs outside the tree anyway)
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*"):
        for p in tree.glob(pattern):
            if p.is_file():
                p.unlink()
    checks = [
        "usr/sbin/grub-mkconfig",
        "usr/sbin/update-grub",
        "usr/bin/grub-editenv",
        "usr/sbin/grub-reboot",
        "usr/lib/grub/i386-pc/boot.img",
        "usr/bin/python3",
        "usr/bin/zstd",
        "usr/sbin/sfdisk",
        "usr/sbin/parted",
        "usr/sbin/sshd",
        "usr/bin/ip",
        "usr/lib/openssh/sftp-server",
    ]
    missing = [c for c in checks if not (tree / c).exists()]
    for kernel_file in ("vmlinuz-*", "initrd.img-*"):
        if not list((tree / "boot").glob(kernel_file)):
            missing.append(f"boot/{kernel_file}")
    if missing:
        raise RigError(f"debootstrap tree {tree} lacks: {', '.join(missing)}")


def build_rootfs(
    out: Path, suite: str = SUITE, packages: tuple[str, ...] = PACKAGES, mirror: str | None = None
) -> None:
    """debootstrap suite into a temporary tree next to out, customize it, tar it to out
    (zstd). Needs root and debootstrap."""
    if os.geteuid() != 0:
        raise RigError("building the Debian rootfs needs root (debootstrap, chroot)")
    if shutil.which("debootstrap", path=base_env()["PATH"]) is None:
        raise RigError("no debootstrap on this host (apt-get install debootstrap)")
    mirror = mirror or debian_mirror(suite)
    debs = cache_dir() / f"debootstrap-{suite}"
    debs.mkdir(parents=True, exist_ok=True)
    tree = Path(tempfile.mkdtemp(prefix=".rootfs-tree-", dir=out.parent))
    try:
        started = time.monotonic()
        argv = ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}"]
        argv += [f"--cache-dir={debs}", suite, str(tree), mirror]
        try:
            run(argv, timeout=_DEBOOTSTRAP_TIMEOUT)
        except CommandError as exc:
            logfile = tree / "debootstrap/debootstrap.log"
            tail = logfile.read_text(errors="replace")[-4000:] if logfile.exists() else ""
            raise CommandError(exc.argv, exc.returncode, exc.stderr + "\n" + tail) from exc
        log.info("debootstrap %s took %.0f s", suite, time.monotonic() - started)
        _customize(tree)
        run(
            [
                "tar",
                "--create",
                "--file",
                out,
                "--use-compress-program",
                _ZSTD_PACK,
                *_TAR_OPTS,
                "--sort=name",
                "-C",
                tree,
                ".",
            ],
            timeout=_DEBOOTSTRAP_TIMEOUT,
        )
    finally:
        _remove_tree(tree)


def debian_rootfs(suite: str = SUITE, packages: tuple[str, ...] = PACKAGES) -> Path:
    """The cached rootfs tarball (built on first use: about a minute and a half)."""
    return cached(f"rootfs-{rootfs_key(suite, packages)}.tar.zst",
                  lambda tmp: build_rootfs(tmp, suite, packages))


def unpack(tarball: Path, directory: Path) -> None:
    """Unpack a rootfs tarball into directory as root: owners, modes, xattrs kept."""
    run(
        [
            "tar",
            "--extract",
            "--file",
            tarball,
            "--use-compress-program",
            _ZSTD_UNPACK,
            *_TAR_OPTS,
            "--same-permissions",
            "-C",
            directory,
        ],
        timeout=_DEBOOTSTRAP_TIMEOUT,
    )
