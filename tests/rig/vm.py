"""The tools VM: run a bash script inside a real Linux (the rig's Debian bookworm) with
test disk images attached, and read what it printed.

    result = run_script("mount /dev/sda1 /mnt && ls /mnt", [tmp_path / "disk.img"])
    assert result.exit_code == 0, result.output

The VM (QEMU, software emulation: ``-accel tcg,thread=multi -cpu qemu64 -smp 2``, never
KVM) boots the kernel and initrd of ``tests.rig.rootfs`` directly (``-kernel``,
``-initrd``), with no network (``-nic none``) and no display:

- the root filesystem is ``root_disk()``: an ext4 image without a partition table made
  from the rootfs tarball, attached as virtio-blk (``/dev/vda``) with ``snapshot=on`` (the
  cached image never changes; the guest's writes go to a throwaway overlay);
- the test disks are attached read-write (raw, ``cache=unsafe``) on the IDE controller,
  in order: ``disks[0]`` is ``/dev/sda``, ``disks[1]`` ``/dev/sdb``, up to four; disk i
  has the serial ``resin-disk<i>`` (``/dev/disk/by-id/ata-QEMU_HARDDISK_resin-disk<i>``);
- ``shares`` (tag -> host directory) are read-only 9p shares the wrapper mounts at
  ``/mnt/<tag>`` before the script runs.

Inside the guest a oneshot systemd unit (after multi-user.target) loads ``qemu_fw_cfg``,
binds the test disks to sd in controller order (see the wrapper: left alone, the kernel
names them in a random order), copies the script from fw_cfg ``opt/autorun`` to
``/run/autorun.sh``, mounts the shares, and runs it as root with ``bash`` in ``/root``,
a clean environment (PATH, HOME, TERM=dumb, LANG=C.UTF-8, PYTHONUNBUFFERED=1), stdin
``/dev/null`` and stdout and stderr on one pipe that ``cat`` copies to the second serial
port (``/dev/ttyS1``, raw: no CR added; stdout is not a tty). Then it runs ``sync``,
writes ``\\nRESIN-MIGRATE-VM-EXIT <code>\\n`` to ttyS1 and powers off (``systemctl
poweroff``: filesystems the script left mounted are unmounted). The kernel and systemd
log to ttyS0 (``VmResult.console``). A reboot or power-off by the script, or a kernel panic,
ends the run (``-no-reboot``, ``panic=1``) with ``exit_code`` None. (The guest has
no D-Bus: ``reboot`` prints "Failed to connect to bus" and reboots all the same.)

Wall time on the CI machines (2 cores, TCG) for a short script: 17 s on an idle host, up
to 26 s under load, nearly all of it the boot to the script (about 1 s to power off).

The kernel and initrd (``boot_files()``) are extracted from the rootfs tarball once and
cached in ``cache_dir()``, keyed by the rootfs key; the root disk is built once, keyed by
the rootfs key and this module's source. Building the root disk needs root (the rootfs
is unpacked with its owners, then ``mkfs.ext4 -d``); running the VM does not.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from tests import imaging
from tests.imaging import MKE2FS_CONF, Drive, cache_dir, cached
from tests.rig import RigError, run
from tests.rig.rootfs import debian_rootfs, rootfs_key, unpack

__all__ = [
    "VmResult",
    "VmError",
    "MAX_DISKS",
    "EXIT_MARKER",
    "boot_files",
    "root_disk",
    "is_cached",
    "run_script",
    "qemu_argv",
]

log = logging.getLogger(__name__)

MiB = 1 << 20
MAX_DISKS = 4  # the PIIX IDE controller: two buses, master and slave
EXIT_MARKER = "RESIN-MIGRATE-VM-EXIT"
SETUP_ERROR_MARKER = "RESIN-MIGRATE-VM-SETUP-ERROR"
ROOT_LABEL = "resin-vm-root"
ROOT_UUID = "6b1f3c52-9e0d-4a7b-8c21-5d4e3f2a1b09"
HOSTNAME = "resin-migrate-vm"
KERNEL_CMDLINE = (
    "root=/dev/vda rootfstype=ext4 rw console=ttyS0,115200 panic=1 fsck.mode=skip "
    "systemd.unit=multi-user.target net.ifnames=0 mitigations=off modprobe.blacklist=sd_mod"
)
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}")  # 9p mount_tag: at most 31 bytes
_UNIT = "resin-migrate-vm-autorun.service"
_WRAPPER = "/usr/local/sbin/resin-migrate-vm-autorun"
_FW_SCRIPT = "opt/autorun"
_FW_SHARES = "opt/resin-migrate/shares"

# The guest side: run by _UNIT after multi-user.target.
_WRAPPER_TEXT = f"""\
#!/bin/bash
# resin-migrate tools VM: run the script QEMU passed as fw_cfg {_FW_SCRIPT}, its output on
# /dev/ttyS1, then report its exit code on ttyS1 and power off. Written by tests/rig/vm.py.
set -u
exec </dev/null 3>/dev/ttyS1
stty -F /dev/ttyS1 raw -echo 115200 || true

finish() {{  # the last line on ttyS1, then power off
    trap - EXIT
    sync
    printf '\\n%s\\n' "$1" >&3
    systemctl --no-block poweroff
    exit 0
}}

setup_error() {{
    echo "resin-migrate-vm: $*" >&2
    finish "{SETUP_ERROR_MARKER} $*"
}}
trap 'setup_error "the wrapper failed (exit code $?)"' EXIT
# SIGTERM: the system is going down under the script (it rebooted or powered off): no
# marker, the run ends without an exit code
trap 'trap - EXIT; exit 143' TERM

# The test disks in controller order, disks[0] as sda: sd probes disks asynchronously and,
# left alone, names them in a random order. sd_mod is blacklisted on the kernel command
# line; load it with the SCSI bus's autoprobe off and bind one disk at a time by H:C:T:L.
scsi=/sys/bus/scsi
if [ -d "$scsi" ]; then
    echo 0 >"$scsi/drivers_autoprobe" || setup_error "cannot turn off SCSI autoprobe"
fi
modprobe sd_mod || setup_error "modprobe sd_mod failed"
disks=()
for path in "$scsi"/devices/*:*:*:*; do
    [ -e "$path" ] && [ "$(cat "$path/type")" = 0 ] && disks+=("${{path##*/}}")
done
for dev in $(printf '%s\\n' "${{disks[@]}}" | sort -t: -k1,1n -k2,2n -k3,3n -k4,4n); do
    echo "$dev" >"$scsi/drivers/sd/bind" || setup_error "cannot bind SCSI disk $dev"
done
echo 1 >"$scsi/drivers_autoprobe" || setup_error "cannot turn on SCSI autoprobe"

fw=/sys/firmware/qemu_fw_cfg/by_name
modprobe qemu_fw_cfg || setup_error "modprobe qemu_fw_cfg failed"
[ -r "$fw/{_FW_SCRIPT}/raw" ] || setup_error "no fw_cfg {_FW_SCRIPT}"
cp "$fw/{_FW_SCRIPT}/raw" /run/autorun.sh || setup_error "cannot read fw_cfg {_FW_SCRIPT}"
if [ -r "$fw/{_FW_SHARES}/raw" ]; then
    modprobe -a 9pnet_virtio 9p || setup_error "modprobe 9pnet_virtio 9p failed"
    read -ra tags <"$fw/{_FW_SHARES}/raw"
    for tag in "${{tags[@]}}"; do
        mkdir -p "/mnt/$tag" || setup_error "mkdir /mnt/$tag failed"
        mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 "$tag" "/mnt/$tag" \\
            || setup_error "cannot mount 9p share $tag"
    done
fi
udevadm settle --timeout=30 || true

# stdout and stderr: one pipe (a FIFO), copied to ttyS1 by cat; not a tty: no pager, no
# colours, no CR. The copier is waited for a moment only: a background process of the
# script may hold the pipe.
mkfifo /run/autorun.out || setup_error "mkfifo failed"
cat /run/autorun.out >&3 &
copier=$!
cd /root || setup_error "no /root"
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    HOME=/root USER=root LOGNAME=root SHELL=/bin/bash TERM=dumb LANG=C.UTF-8 \\
    PYTHONUNBUFFERED=1 \\
    bash /run/autorun.sh >/run/autorun.out 2>&1 3>&-
code=$?
for _ in $(seq 50); do
    kill -0 "$copier" 2>/dev/null || break
    sleep 0.1
done
finish "{EXIT_MARKER} $code"
"""

_UNIT_TEXT = f"""\
[Unit]
Description=resin-migrate tools VM: run the fw_cfg {_FW_SCRIPT} script
After=multi-user.target

[Service]
Type=oneshot
ExecStart={_WRAPPER}
StandardInput=null
StandardOutput=journal+console
StandardError=inherit
TimeoutStartSec=infinity
FailureAction=poweroff

[Install]
WantedBy=multi-user.target
"""

#: Units masked in the guest: gettys (a getty on a serial port hangs it up and cuts the
#: output) and periodic jobs that have no business in a throwaway VM.
_MASKED = (
    "serial-getty@.service",
    "getty@.service",
    "console-getty.service",
    "getty-static.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
)

#: What scripts in the guest can count on (checked when the root disk is built).
_GUEST_TOOLS = (
    "usr/bin/bash",
    "usr/bin/stty",
    "usr/bin/sync",
    "usr/bin/mount",
    "usr/bin/umount",
    "usr/bin/lsblk",
    "usr/bin/gzip",
    "usr/bin/zstd",
    "usr/bin/python3",
    "usr/sbin/blkid",
    "usr/sbin/sfdisk",
    "usr/sbin/fdisk",
    "usr/sbin/parted",
    "usr/sbin/mkfs.ext4",
    "usr/sbin/e2fsck",
    "usr/sbin/mkfs.fat",
    "usr/sbin/fsck.fat",
    "usr/sbin/modprobe",
)


@dataclasses.dataclass(frozen=True)
class VmResult:
    console: str  # serial ttyS0 (kernel + boot messages)
    output: str  # what the script printed (stdout+stderr), from ttyS1
    exit_code: int | None  # the script's exit code; None if it never finished
    seconds: float  # wall time of the QEMU run (boot to power-off)


class VmError(RigError):
    """The VM could not run the script at all: QEMU refused to start or failed, or the
    guest-side wrapper could not set up (fw_cfg, shares). ``result`` holds the logs."""

    def __init__(self, message: str, result: VmResult) -> None:
        self.result = result
        tail = result.console[-3000:]
        super().__init__(f"{message}\n--- console (tail) ---\n{tail}")


# --------------------------------------------------------------------------- boot files


def boot_files() -> tuple[Path, Path]:
    """(vmlinuz, initrd.img) of the rig's rootfs, extracted from its tarball once and
    cached in cache_dir()/vm-boot-<rootfs key>/. No root needed once the tarball exists."""
    def fill(tmp: Path) -> None:
        tarball = debian_rootfs()
        members = ["./boot/vmlinuz-*", "./boot/initrd.img-*"]
        run(
            ["tar", "--extract", "--file", tarball, "--use-compress-program", "zstd -d -q",
             "--wildcards", "--no-same-owner", "-C", tmp, *members],
            timeout=600,
        )
        for pattern, target in (("vmlinuz-*", "vmlinuz"), ("initrd.img-*", "initrd.img")):
            found = sorted((tmp / "boot").glob(pattern))
            if len(found) != 1:
                raise RigError(f"{tarball}: expected one /boot/{pattern}, found {len(found)}")
            found[0].rename(tmp / target)
            (tmp / "version").write_text(found[0].name.split("-", 1)[1] + "\n")
        shutil.rmtree(tmp / "boot")

    directory = cached(f"vm-boot-{rootfs_key()}", fill, directory=True)
    return directory / "vmlinuz", directory / "initrd.img"


# --------------------------------------------------------------------------- root disk


def _root_key() -> str:
    return imaging.key(rootfs_key(), Path(__file__), MKE2FS_CONF)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_text(text)
    os.chmod(path, mode)


def _symlink(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.symlink_to(target)


def _customize(tree: Path) -> None:
    # checked inside the tree: many are absolute symlinks (/usr/sbin/modprobe -> /bin/kmod)
    check = 'for f; do [ -x "/$f" ] || echo "$f"; done'
    missing = run(["chroot", tree, "/bin/sh", "-c", check, "sh", *_GUEST_TOOLS]).stdout.split()
    if missing:
        raise RigError(f"the rootfs lacks what the tools VM promises: {', '.join(missing)}")
    _write(tree / "etc/hostname", HOSTNAME + "\n")
    _write(
        tree / "etc/hosts",
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\t\tlocalhost ip6-localhost\n",
    )
    _write(tree / "etc/fstab", "/dev/vda\t/\text4\trw,errors=remount-ro\t0\t0\n")
    journald = tree / "etc/systemd/journald.conf.d/resin-migrate-vm.conf"
    _write(journald, "[Journal]\nStorage=volatile\n")
    _write(tree / _WRAPPER.lstrip("/"), _WRAPPER_TEXT, 0o755)
    system = tree / "etc/systemd/system"
    _write(system / _UNIT, _UNIT_TEXT)
    _symlink(system / "multi-user.target.wants" / _UNIT, f"/etc/systemd/system/{_UNIT}")
    _symlink(system / "default.target", "/lib/systemd/system/multi-user.target")
    for unit in _MASKED:
        _symlink(system / unit, "/dev/null")
    for wants in system.glob("*.wants/*"):
        if wants.name in _MASKED or re.sub(r"@[^.]+\.", "@.", wants.name) in _MASKED:
            wants.unlink()


def _du_bytes(tree: Path) -> int:
    return int(run(["du", "-s", "--block-size=1", "-x", tree]).stdout.split()[0])


def _make_root_disk(image: Path, tarball: Path) -> None:
    if os.geteuid() != 0:
        raise RigError(
            "building the tools VM root disk needs root (the rootfs is unpacked with its "
            "owners); later runs reuse the cached image without root"
        )
    tree = Path(tempfile.mkdtemp(prefix=".vm-root-tree-", dir=image.parent))
    try:
        os.chmod(tree, 0o755)
        unpack(tarball, tree)
        _customize(tree)
        used = _du_bytes(tree)
        size_mib = max(2048, -(-(used * 13 // 10 + 768 * MiB) // (256 * MiB)) * 256)
        conf = Path(tree.parent) / f"{tree.name}.mke2fs.conf"
        conf.write_text(MKE2FS_CONF)
        try:
            with open(image, "wb") as f:
                f.truncate(size_mib * MiB)
            run(
                ["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-U", ROOT_UUID, "-d", tree,
                 image],
                env={"MKE2FS_CONFIG": str(conf)},
                timeout=1200,
            )
        finally:
            conf.unlink(missing_ok=True)
        run(["e2fsck", "-fn", image], timeout=600)
    finally:
        shutil.rmtree(tree)


def _root_disk_path() -> Path:
    return cache_dir() / f"vm-root-{_root_key()}.img"


def is_cached() -> bool:
    """True when the kernel, initrd and root disk are cached: run_script() needs no root."""
    return (cache_dir() / f"vm-boot-{rootfs_key()}").is_dir() and _root_disk_path().exists()


def root_disk() -> Path:
    """The tools VM's root filesystem image (ext4, no partition table), built once into
    cache_dir()/vm-root-<key>.img. Never modify it: the VM attaches it with snapshot=on.
    Building it needs root; about a minute."""
    if _root_disk_path().exists():
        return _root_disk_path()
    tarball = debian_rootfs()
    return cached(_root_disk_path().name, lambda tmp: _make_root_disk(tmp, tarball))


# --------------------------------------------------------------------------- run


def _machine(kernel: Path, initrd: Path, root: Path, disks: list[Path],
             shares: dict[str, Path], script: Path) -> tuple[list[Drive], dict]:
    """The tools VM (see the module docstring): the test disks on the IDE controller in
    order, the root disk as virtio-blk with snapshot=on, direct kernel boot, no reboot."""
    fw_cfg: dict[str, Path | str] = {_FW_SCRIPT: script}
    if shares:
        fw_cfg[_FW_SHARES] = " ".join(shares)
    drives = [*(Drive(disk) for disk in disks), Drive(root, bus="virtio", snapshot=True)]
    return drives, {"kernel": kernel, "initrd": initrd, "append": KERNEL_CMDLINE,
                    "fw_cfg": fw_cfg, "shares": shares, "reboot": False}


def qemu_argv(*, kernel: Path, initrd: Path, root: Path, disks: list[Path],
              shares: dict[str, Path], serials: tuple[Path, Path], script: Path) -> list[str]:
    """The QEMU command line of one run."""
    drives, machine = _machine(kernel, initrd, root, disks, shares, script)
    return imaging.qemu_argv(drives, list(serials), **machine)


def _parse_output(text: str) -> tuple[str, int | None, str | None]:
    """(the script's output, its exit code, a setup error) from ttyS1: the wrapper's last
    marker line is taken out; anything after it (a background process of the script) is
    kept in the output."""
    pattern = re.compile(rf"\n({EXIT_MARKER} (-?\d+)|{SETUP_ERROR_MARKER} ([^\n]*))\n")
    found = list(pattern.finditer(text))
    if not found:
        return text, None, None
    m = found[-1]
    output = text[: m.start()] + text[m.end():]
    if m.group(2) is not None:
        return output, int(m.group(2)), None
    return output, None, m.group(3)


def run_script(
    script: str,
    disks: list[Path],
    *,
    shares: dict[str, Path] | None = None,
    timeout: float = 300,
    memory_mib: int = 1024,
) -> VmResult:
    """Boot the tools VM with disks attached (disks[0] is /dev/sda, ...), run script with
    bash as root, power off; see the module docstring.

    timeout: seconds for the whole QEMU run (boot, script, power-off), not counting the
    first build of the cached root disk; when it expires QEMU is killed and exit_code is
    None, with the logs so far. Raises VmError when QEMU fails or the guest cannot set
    up, ValueError for bad arguments, RigError when the rig cannot be built."""
    shares = dict(shares or {})
    disks = [Path(d).resolve() for d in disks]
    if len(disks) > MAX_DISKS:
        raise ValueError(f"at most {MAX_DISKS} disks (IDE), got {len(disks)}")
    for disk in disks:
        if not (disk.is_file() or disk.is_block_device()):
            raise ValueError(f"not a disk image or block device: {disk}")
    for tag, directory in shares.items():
        if not _TAG.fullmatch(tag):
            raise ValueError(f"bad share tag {tag!r}: letters, digits, _ . -, at most 31")
        if not Path(directory).is_dir():
            raise ValueError(f"share {tag}: not a directory: {directory}")
    shares = {tag: Path(d).resolve() for tag, d in shares.items()}
    kernel, initrd = boot_files()
    root = root_disk()
    with tempfile.TemporaryDirectory(prefix="resin-vm-") as tmp_name:
        script_file = Path(tmp_name) / "autorun.sh"
        script_file.write_text(script)
        drives, machine = _machine(kernel, initrd, root, disks, shares, script_file)
        try:
            result = imaging.boot(drives, timeout=timeout, memory_mib=memory_mib, **machine)
        except imaging.BootError as exc:
            failed = VmResult(console=exc.result.serial0_text, output=exc.result.serial1_text,
                              exit_code=None, seconds=exc.result.seconds)
            raise VmError(str(exc).split("\n", 1)[0], failed) from exc
    output, exit_code, setup_error = _parse_output(result.serial1_text)
    vm_result = VmResult(console=result.serial0_text, output=output, exit_code=exit_code,
                         seconds=result.seconds)
    if result.reason == "timeout":
        log.info("tools VM: timed out after %.0f s", result.seconds)
        return vm_result
    if setup_error is not None:
        raise VmError(f"tools VM setup failed: {setup_error}", vm_result)
    return vm_result
