"""The legacy device as a machine: a legacy disk image that boots by itself under BIOS,
and a QEMU run of it that reads both serial ports live.

    image = bootable_legacy_image(LegacySpec())                 # cached; never modify it
    disk = tmp_path / "disk.img"
    run(["cp", "--sparse=always", image, disk])                  # a throwaway copy per run
    result = boot(disk, autorun="uname -r\\npoweroff\\n", timeout=300)
    assert result.reason == "poweroff"
    print(result.serial1_text)

``bootable_legacy_image(spec)`` is ``cached_legacy_image(spec)`` (tests.rig.legacy) with:

- GRUB really installed: ``grub-install /dev/sda`` (boot code in the MBR, core.img in the
  gap before p1, modules in /boot/grub/i386-pc) and ``update-grub``, both run INSIDE the
  tools VM (tests.rig.vm), chrooted into the legacy root mounted from /dev/sda1 with /dev,
  /proc and /sys bound. The VM has udev, so grub.cfg says ``root=UUID=<ROOT_UUID>`` and
  carries the ``--hint-bios=hd0,msdos1`` search hints of an installed system. (On the host
  grub-install cannot map a loop device to a BIOS drive.) The MBR is read back: core.img
  must be embedded in the gap before p1 (62 sectors with ``Alignment.CYLINDER``), never
  left in /boot/grub behind blocklists.
- ``quiet`` dropped from ``GRUB_CMDLINE_LINUX_DEFAULT``: the kernel's and systemd's boot
  messages go to ttyS0 (``console=ttyS0,115200`` and GRUB's serial terminal were already
  set by tests.rig.rootfs), so a failed boot can be read in the log.
- the oneshot unit ``resin-migrate-autorun.service`` (``After=multi-user.target``, wanted by
  it) running ``/usr/local/sbin/resin-migrate-autorun``, which
    1. loads ``qemu_fw_cfg``; without a fw_cfg entry ``opt/autorun`` it prints
       ``resin-migrate-autorun: no fw_cfg opt/autorun: nothing to run`` on ttyS1 and exits
       (a boot of this disk without an autorun script does nothing);
    2. when ``/var/lib/resin-migrate-autorun.done`` exists it prints
       ``resin-migrate-autorun: already done ...`` (``SKIP_LINE``) on ttyS1 and exits;
    3. otherwise writes that file (and syncs) BEFORE it runs the script, so the script runs
       once per disk, even when QEMU keeps the fw_cfg entry across guest reboots: after a
       reboot back into the legacy system (a fallback from the flasher, stage 2 refusing)
       the unit does not run stage 1 again;
    4. prints ``START_MARKER`` on ttyS1, runs the script with bash as root in /root (clean
       environment: PATH, HOME, TERM=dumb, LANG=C.UTF-8, PYTHONUNBUFFERED=1; stdin
       /dev/null), its stdout and stderr on one pipe (not a tty: no pager, no colours, no
       CR) that ``cat`` copies to ttyS1 (raw), then ``EXIT_MARKER <code>``.
  The unit does not power off: the script decides (``poweroff``, ``reboot``). When the
  script reboots or powers off, systemd stops the unit: the script gets SIGTERM, the
  copier ignores it and drains the pipe, and no ``EXIT_MARKER`` is printed.
- ``serial-getty@ttyS1.service`` masked (a getty hangs the port up); the getty on ttyS0
  stays (the device has a login prompt there, as a real one would).

The cache key covers the spec, the legacy image's key and this module's source. Building
needs what cached_legacy_image() and the tools VM need the first time (root, loop
devices); later builds of another spec need only QEMU and root for the cache directory.

``boot(disk, ...)`` boots ``disk`` by BIOS (SeaBIOS, no ``-kernel``) as the first IDE disk
(``/dev/sda``, serial ``resin-disk0``) with ``tests.imaging.boot``: raw, read-write,
``cache=unsafe``, software emulation, no network (or with ``ssh_port`` QEMU's user
networking, SSH forwarded), a guest reboot resets the machine and it
boots again from the disk in the same QEMU process with the same fw_cfg entry; both serial
ports read live, each line stamped when it arrives (see ``tests.imaging.boot`` for how a
run ends and what the disk holds then).
"""

from __future__ import annotations

import logging
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tests import imaging
from tests.imaging import BootError, BootResult, Drive, cached
from tests.rig import RigError, run
from tests.rig.legacy import ROOT_UUID, LegacySpec, cached_legacy_image, legacy_key, partitions
from tests.rig.vm import run_script

__all__ = [
    "BootResult",
    "BootError",
    "UNIT",
    "DONE_FILE",
    "START_MARKER",
    "EXIT_MARKER",
    "SKIP_LINE",
    "NO_AUTORUN_LINE",
    "MAX_EXTRA_DISKS",
    "bootable_legacy_image",
    "boot",
]

log = logging.getLogger(__name__)

UNIT = "resin-migrate-autorun.service"
WRAPPER = "/usr/local/sbin/resin-migrate-autorun"
DONE_FILE = "/var/lib/resin-migrate-autorun.done"
START_MARKER = "RESIN-MIGRATE-AUTORUN-START"
EXIT_MARKER = "RESIN-MIGRATE-AUTORUN-EXIT"
SKIP_LINE = "resin-migrate-autorun: already done"
NO_AUTORUN_LINE = "resin-migrate-autorun: no fw_cfg opt/autorun"
MAX_EXTRA_DISKS = 3  # the PIIX IDE controller has four places; the boot disk takes one
_FW_SCRIPT = "opt/autorun"
_BUILD_TIMEOUT = 600

# The guest side, in the legacy root: run by UNIT after multi-user.target.
_WRAPPER_TEXT = f"""\
#!/bin/bash
# resin-migrate test rig: run the script QEMU passed as fw_cfg {_FW_SCRIPT}, once per disk,
# its output on /dev/ttyS1. Written by tests/rig/bootable.py.
set -u
exec </dev/null 3>/dev/ttyS1
stty -F /dev/ttyS1 raw -echo 115200 || true
say() {{ printf 'resin-migrate-autorun: %s\\n' "$*" >&3; }}

raw=/sys/firmware/qemu_fw_cfg/by_name/{_FW_SCRIPT}/raw
modprobe qemu_fw_cfg || say "modprobe qemu_fw_cfg failed"
if [ ! -r "$raw" ]; then
    say "no fw_cfg {_FW_SCRIPT}: nothing to run"
    exit 0
fi
if [ -e {DONE_FILE} ]; then
    say "already done ({DONE_FILE} exists): not running {_FW_SCRIPT} again"
    exit 0
fi
script=/run/resin-migrate-autorun.sh
out=/run/resin-migrate-autorun.out
if ! cp "$raw" "$script"; then
    say "cannot read fw_cfg {_FW_SCRIPT}"
    exit 1
fi
# before the script runs: it may reboot, and the next boot must not run it again
mkdir -p "$(dirname {DONE_FILE})"
if ! date -u +%Y-%m-%dT%H:%M:%SZ >{DONE_FILE}; then
    say "cannot write {DONE_FILE}"
fi
sync

# stdout and stderr: one pipe (a FIFO), copied to ttyS1 by cat, which ignores SIGTERM: when
# the script reboots, systemd stops this unit and cat still drains what the script wrote
rm -f "$out"
mkfifo "$out" || {{ say "mkfifo $out failed"; exit 1; }}
(trap '' TERM; exec cat "$out" >&3) &
copier=$!
printf '%s\\n' "{START_MARKER}" >&3
cd /root || exit 1
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    HOME=/root USER=root LOGNAME=root SHELL=/bin/bash TERM=dumb LANG=C.UTF-8 \\
    PYTHONUNBUFFERED=1 \\
    bash "$script" >"$out" 2>&1 3>&-
code=$?
for _ in $(seq 50); do
    kill -0 "$copier" 2>/dev/null || break
    sleep 0.1
done
printf '\\n%s %d\\n' "{EXIT_MARKER}" "$code" >&3
exit 0
"""

_UNIT_TEXT = f"""\
[Unit]
Description=resin-migrate test rig: run the fw_cfg {_FW_SCRIPT} script once
After=multi-user.target

[Service]
Type=oneshot
ExecStart={WRAPPER}
StandardInput=null
StandardOutput=journal+console
StandardError=inherit
TimeoutStartSec=infinity
TimeoutStopSec=15

[Install]
WantedBy=multi-user.target
"""

# Run in the tools VM with the copy of the legacy image as /dev/sda and the files above in
# the share "rig". Prints "grub.cfg: <first linux line>" and "checks: ok" for the host.
_INSTALL_SCRIPT = f"""\
set -eu
root=/mnt/legacy
mkdir -p "$root"
mount -t ext4 /dev/sda1 "$root"
mount --bind /dev "$root/dev"
mount -t proc proc "$root/proc"
mount --bind /sys "$root/sys"
install -m 0755 /mnt/rig/wrapper "$root{WRAPPER}"
install -m 0644 /mnt/rig/unit "$root/etc/systemd/system/{UNIT}"
systemctl --root="$root" enable {UNIT}
systemctl --root="$root" mask serial-getty@ttyS1.service
sed -i 's/^GRUB_CMDLINE_LINUX_DEFAULT=.*/GRUB_CMDLINE_LINUX_DEFAULT=""/' "$root/etc/default/grub"
grep -qx 'GRUB_CMDLINE_LINUX_DEFAULT=""' "$root/etc/default/grub"
chroot "$root" grub-install --target=i386-pc /dev/sda
echo "core.img: $(stat -c %s "$root/boot/grub/i386-pc/core.img") bytes"
chroot "$root" update-grub
cfg="$root/boot/grub/grub.cfg"
echo "grub.cfg: $(grep -m1 -E '^[[:space:]]*linux[[:space:]]' "$cfg" | sed 's/^[[:space:]]*//')"
grep -q -- '--hint-bios=hd0,msdos1' "$cfg"
[ -f "$root/boot/grub/i386-pc/normal.mod" ] && [ -f "$root/boot/grub/i386-pc/core.img" ]
[ "$(systemctl --root="$root" is-enabled {UNIT})" = enabled ]
[ "$(systemctl --root="$root" is-enabled serial-getty@ttyS1.service)" = masked ]
[ ! -e "$root{DONE_FILE}" ]
umount "$root/sys" "$root/proc" "$root/dev"
umount "$root"
e2fsck -fn /dev/sda1 >/dev/null
echo "checks: ok"
"""


# --------------------------------------------------------------------------- the image


def _key(spec: LegacySpec) -> str:
    return imaging.key(spec, legacy_key(spec), Path(__file__))


def _check_mbr(image: Path, spec: LegacySpec) -> None:
    """GRUB's boot code in the MBR and core.img embedded in the gap before p1 (boot.img's
    kernel sector 1, diskboot.img's blocklist from sector 2 ending before p1), not left in
    /boot/grub with blocklists (GRUB's include/grub/i386/pc/boot.h, util/setup.c)."""
    with open(image, "rb") as f:
        mbr = f.read(512)
        diskboot = f.read(512)
    if mbr[510:512] != b"\x55\xaa" or not any(mbr[:440]) or b"GRUB" not in mbr[:440]:
        raise RigError(f"{image}: no GRUB boot code in the MBR after grub-install")
    kernel_sector = int.from_bytes(mbr[0x5C:0x64], "little")
    start, length = struct.unpack_from("<QH", diskboot, 512 - 12)
    first = partitions(spec)[0].start
    if kernel_sector != 1 or start != 2 or not 0 < length <= first - start:
        raise RigError(f"{image}: grub-install did not embed core.img before p1 (sector "
                       f"{first}): boot.img points at sector {kernel_sector}, diskboot.img's "
                       f"first blocklist at {start}+{length}")


def _install(image: Path, spec: LegacySpec) -> None:
    """Install GRUB and the autorun unit into image (a copy of a legacy image of spec) in
    the tools VM; raise RigError unless every check passed."""
    with tempfile.TemporaryDirectory(prefix="bootable-rig-") as tmp_name:
        files = Path(tmp_name)
        (files / "wrapper").write_text(_WRAPPER_TEXT)
        (files / "unit").write_text(_UNIT_TEXT)
        result = run_script(_INSTALL_SCRIPT, [image], shares={"rig": files},
                            timeout=_BUILD_TIMEOUT)
    lines = result.output.splitlines()
    if result.exit_code != 0 or "checks: ok" not in lines:
        raise RigError(
            f"installing GRUB into {image} in the tools VM failed (exit code "
            f"{result.exit_code}):\n{result.output[-4000:]}\n--- console (tail) ---\n"
            f"{result.console[-2000:]}"
        )
    linux = next((line for line in lines if line.startswith("grub.cfg: ")), "")
    words = linux.split()
    if f"root=UUID={ROOT_UUID}" not in words or any(
        w.startswith(("root=/dev/loop", "root=/dev/sd")) for w in words
    ):
        raise RigError(f"update-grub in the VM wrote an unexpected linux line: {linux!r}")
    _check_mbr(image, spec)
    core = next((line for line in lines if line.startswith("core.img: ")), "core.img: ?")
    log.info("GRUB installed into %s in the tools VM in %.0f s (%s)", image, result.seconds,
             core)


def bootable_legacy_image(spec: LegacySpec | None = None) -> Path:
    """Path of the BIOS-bootable legacy image of spec (default LegacySpec(); see the module
    docstring), built once into cache_dir()/bootable-legacy-<key>.img. Never modify it: boot a
    sparse copy."""
    spec = LegacySpec() if spec is None else spec

    def build(tmp: Path) -> None:
        run(["cp", "--sparse=always", cached_legacy_image(spec), tmp])
        started = time.monotonic()
        _install(tmp, spec)
        log.info("GRUB and the autorun unit installed in %.0f s", time.monotonic() - started)

    return cached(f"bootable-legacy-{_key(spec)}.img", build)


# --------------------------------------------------------------------------- boot


def boot(
    disk: Path,
    *,
    autorun: str | None = None,
    timeout: float = 900,
    until: str | None = None,
    cut: imaging.Cut | None = None,
    extra_disks: Sequence[Path] = (),
    memory_mib: int = 1024,
    log_dir: Path | None = None,
    ssh_port: int | None = None,
    on_line: Callable[[float, str], None] | None = None,
) -> BootResult:
    """Boot disk by BIOS in QEMU and read both serial ports until the guest powers off, a
    line contains until, or timeout seconds have passed; see the module docstring.

    autorun: a bash script for resin-migrate-autorun.service (fw_cfg opt/autorun).
    cut: where to cut the power (tests.imaging.Cut): QEMU killed, reason "cut".
    extra_disks: more IDE disks (/dev/sdb...), at most MAX_EXTRA_DISKS.
    log_dir: keep serial0.log, serial1.log and qemu.log there (default: a temporary
    directory, removed).
    ssh_port: a network (QEMU's user networking: the guest gets 10.0.2.15 by DHCP and
    reaches this host as 10.0.2.2) with the guest's port 22 on 127.0.0.1:ssh_port.
    on_line(seconds, line): called with each serial line as it arrives.

    Raises BootError when QEMU exits with an error, ValueError for bad arguments."""
    if len(extra_disks) > MAX_EXTRA_DISKS:
        raise ValueError(f"at most {MAX_EXTRA_DISKS} extra disks (IDE), got {len(extra_disks)}")
    with tempfile.TemporaryDirectory(prefix="resin-autorun-") as tmp:
        fw_cfg: dict[str, Path | str] = {}
        if autorun is not None:
            script = Path(tmp) / "autorun.sh"
            script.write_text(autorun)
            fw_cfg[_FW_SCRIPT] = script
        drives = [Drive(Path(d)) for d in (disk, *extra_disks)]
        return imaging.boot(drives, timeout=timeout, until=until, cut=cut, log_dir=log_dir,
                            fw_cfg=fw_cfg, memory_mib=memory_mib, ssh_port=ssh_port,
                            on_line=on_line)
