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
  grub-install cannot map a loop device to a BIOS drive.)
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
(``/dev/sda``, serial ``resin-disk0``), raw, read-write, ``cache=unsafe``, software
emulation (``-accel tcg,thread=multi -cpu qemu64 -smp 2``), no network, without
``-no-reboot``: a guest reboot resets the machine and it boots again from the disk, in the
same QEMU process, with the same fw_cfg entry. Both serial ports are written to files that
are polled every 50 ms; each line is timestamped (seconds since QEMU started) when it is
read, with terminal control sequences (colours, cursor moves) and CRs at its ends removed:
systemd's status lines read ``[  OK  ] Reached target multi-user.target - Multi-User
System.`` The run ends when QEMU exits by itself (the guest powered off: ``"poweroff"``), when a
line on either port contains ``until`` (``"marker"``; also when the line shows up in the
last output of a QEMU that exited), or at ``timeout`` (``"timeout"``). QEMU is always ended
(SIGTERM, SIGKILL after 5 s) before boot() returns, also on an exception. With
``"marker"`` or ``"timeout"`` the disk holds what the guest had written to it when QEMU
was killed (``cache=unsafe`` keeps no data in QEMU; the guest's page cache is lost).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.rig import RigError, base_env, run
from tests.rig.legacy import ROOT_UUID, LegacySpec, _cache_key, cached_legacy_image
from tests.rig.vm import QEMU, _opt, _stop, run_script
from tests.synthetic import cache_dir

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
    "boot_argv",
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
_POLL = 0.05

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


class BootError(RigError):
    """QEMU could not run the disk (refused to start, failed). ``result`` holds the logs."""

    def __init__(self, message: str, result: BootResult) -> None:
        self.result = result
        tail = "\n".join(line for _, line in result.serial0[-60:])
        super().__init__(f"{message}\n--- serial0 (tail) ---\n{tail}")


@dataclasses.dataclass
class BootResult:
    serial0: list[tuple[float, str]]  # (seconds since QEMU started, line) on ttyS0
    serial1: list[tuple[float, str]]  # the same for ttyS1
    reason: str  # "poweroff", "timeout" or "marker"
    seconds: float  # wall time from QEMU's start to the end of the run

    @property
    def serial0_text(self) -> str:
        return "".join(line + "\n" for _, line in self.serial0)

    @property
    def serial1_text(self) -> str:
        return "".join(line + "\n" for _, line in self.serial1)

    def lines(self, needle: str, port: int | None = None) -> list[tuple[float, str]]:
        """The lines containing needle, on port 0, 1 or (None) both, in time order."""
        both = (self.serial0, self.serial1)
        ports = list(both) if port is None else [both[port]]
        found = [item for lines in ports for item in lines if needle in item[1]]
        return sorted(found, key=lambda item: item[0])

    def first(self, needle: str, port: int | None = None) -> float | None:
        """When the first line containing needle arrived (seconds), None if none did."""
        found = self.lines(needle, port)
        return found[0][0] if found else None


# --------------------------------------------------------------------------- the image


def _key(spec: LegacySpec) -> str:
    h = hashlib.sha256()
    h.update(repr(spec).encode())
    h.update(_cache_key(spec).encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:20]


def _check_mbr(image: Path) -> None:
    with open(image, "rb") as f:
        mbr = f.read(512)
    if mbr[510:512] != b"\x55\xaa" or not any(mbr[:440]) or b"GRUB" not in mbr[:440]:
        raise RigError(f"{image}: no GRUB boot code in the MBR after grub-install")


def _install(image: Path) -> None:
    """Install GRUB and the autorun unit into image (a copy of a legacy image) in the
    tools VM; raise RigError unless every check passed."""
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
    _check_mbr(image)
    log.info("GRUB installed into %s in the tools VM in %.0f s", image, result.seconds)


def bootable_legacy_image(spec: LegacySpec | None = None) -> Path:
    """Path of the BIOS-bootable legacy image of spec (default LegacySpec(); see the module
    docstring), built once into cache_dir()/bootable-legacy-<key>.img. Never modify it: boot a
    sparse copy."""
    spec = LegacySpec() if spec is None else spec
    final = cache_dir() / f"bootable-legacy-{_key(spec)}.img"
    if final.exists():
        return final
    source = cached_legacy_image(spec)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        started = time.monotonic()
        run(["cp", "--sparse=always", source, tmp])
        _install(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
        log.info("bootable legacy image %s built in %.0f s", final.name, time.monotonic() - started)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


# --------------------------------------------------------------------------- boot


def boot_argv(
    *,
    disk: Path,
    serial0: Path,
    serial1: Path,
    autorun: Path | None = None,
    extra_disks: Sequence[Path] = (),
    memory_mib: int = 1024,
) -> list[str]:
    """The QEMU command line of boot() (see the module docstring)."""
    argv = [
        QEMU,
        "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", "pc", "-accel", "tcg,thread=multi", "-cpu", "qemu64", "-smp", "2",
        "-m", str(memory_mib), "-rtc", "base=utc", "-nic", "none",
        "-chardev", f"file,id=ttyS0,path={_opt(serial0)}",
        "-chardev", f"file,id=ttyS1,path={_opt(serial1)}",
        "-serial", "chardev:ttyS0", "-serial", "chardev:ttyS1",
        "-device", "virtio-rng-pci",
    ]
    for i, image in enumerate([disk, *extra_disks]):
        boot_index = ",bootindex=0" if i == 0 else ""
        argv += [
            "-drive", f"if=none,id=disk{i},file={_opt(image)},format=raw,cache=unsafe",
            "-device",
            f"ide-hd,drive=disk{i},bus=ide.{i // 2},unit={i % 2},serial=resin-disk{i}"
            + boot_index,
        ]
    if autorun is not None:
        argv += ["-fw_cfg", f"name={_FW_SCRIPT},file={_opt(autorun)}"]
    return argv


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


def boot(
    disk: Path,
    *,
    autorun: str | None = None,
    timeout: float = 900,
    until: str | None = None,
    extra_disks: Sequence[Path] = (),
    memory_mib: int = 1024,
    log_dir: Path | None = None,
) -> BootResult:
    """Boot disk by BIOS in QEMU and read both serial ports until the guest powers off, a
    line contains until, or timeout seconds have passed; see the module docstring.

    autorun: a bash script for resin-migrate-autorun.service (fw_cfg opt/autorun).
    extra_disks: more IDE disks (/dev/sdb...), at most MAX_EXTRA_DISKS.
    log_dir: keep serial0.log, serial1.log and qemu.log there (default: a temporary
    directory, removed).

    Raises BootError when QEMU exits with an error, ValueError for bad arguments."""
    disks = [Path(d).resolve() for d in [disk, *extra_disks]]
    if len(disks) > 1 + MAX_EXTRA_DISKS:
        raise ValueError(f"at most {MAX_EXTRA_DISKS} extra disks (IDE), got {len(disks) - 1}")
    for d in disks:
        if not (d.is_file() or d.is_block_device()):
            raise ValueError(f"not a disk image or block device: {d}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, not {timeout}")
    qemu = shutil.which(QEMU, path=base_env()["PATH"])
    if qemu is None:
        raise RigError(f"no {QEMU} on this host (apt-get install qemu-system-x86)")

    with tempfile.TemporaryDirectory(prefix="resin-boot-") as tmp_name:
        logs = Path(log_dir) if log_dir is not None else Path(tmp_name)
        logs.mkdir(parents=True, exist_ok=True)
        serial0, serial1, qemu_log = logs / "serial0.log", logs / "serial1.log", logs / "qemu.log"
        for path in (serial0, serial1):
            path.write_bytes(b"")  # opened for reading before QEMU starts
        script = None
        if autorun is not None:
            script = Path(tmp_name) / "autorun.sh"
            script.write_text(autorun)
        argv = boot_argv(disk=disks[0], serial0=serial0, serial1=serial1, autorun=script,
                         extra_disks=disks[1:], memory_mib=memory_mib)
        argv[0] = qemu
        env = base_env()
        env["TMPDIR"] = tmp_name
        log.debug("boot: %s", " ".join(argv))
        ports = [_Lines(serial0), _Lines(serial1)]
        reason = ""
        started = time.monotonic()
        try:
            with open(qemu_log, "wb") as qemu_out:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qemu_out,
                                        stderr=subprocess.STDOUT, env=env)
                try:
                    reason = _watch(proc, ports, started, timeout, until)
                finally:
                    _stop(proc)
            seconds = time.monotonic() - started
            for port in ports:
                port.flush(seconds)
        finally:
            for port in ports:
                port.close()
        result = BootResult(serial0=ports[0].lines, serial1=ports[1].lines, reason=reason,
                            seconds=seconds)
        if reason == "poweroff" and proc.returncode != 0:
            message = qemu_log.read_text(errors="replace").strip()
            raise BootError(f"{QEMU} exited with {proc.returncode}: {message}", result)
        log.info("boot of %s: %s after %.1f s", disks[0].name, reason, seconds)
        return result


def _watch(
    proc: subprocess.Popen[bytes], ports: list[_Lines], started: float, timeout: float,
    until: str | None,
) -> str:
    """Poll the serial logs until QEMU exits, until shows up or the timeout passes."""

    def seen(now: float) -> bool:
        hit = False
        for port in ports:
            for line in port.poll(now):
                hit = hit or (until is not None and until in line)
        if not hit and until is not None:
            for port in ports:
                if until in port.partial():  # a prompt without a newline
                    port.flush(now)
                    hit = True
        return hit

    while True:
        exited = proc.poll() is not None
        now = time.monotonic() - started
        if seen(now):
            return "marker"
        if exited:  # the output read after the exit was complete: checked above
            return "poweroff"
        if now >= timeout:
            return "timeout"
        time.sleep(_POLL)
