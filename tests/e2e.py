"""The end-to-end migration of a legacy Debian VM to the resinOS stand-in, as one run.

    result = migrate(LegacySpec(), workdir)          # raises E2EError naming the phase
    print(result.summary())

The bootable flasher of a release row (tests.rig.bootimages: 2.113 by default, with its
systemd units and the initramfs migrator's stand-in; 2.51 for the older scenario) goes
through `invoke build-flasher`'s code; the bundle and a backup script are copied onto a
bootable legacy disk (tests.rig.bootable); QEMU boots it by BIOS and stays up across the
guest's reboots: the legacy system runs `resin-migrate.pyz stage1 --yes --reboot`, GRUB's
one-shot entry boots the flasher from the former swap area, its initramfs migrator
declines, systemd starts stage 2 through the unit the builder installed (the flasher's own
flashing and registration units masked), stage 2 writes resinOS and reboots, the resinOS
stand-in reports on the serial console and powers off: the fleet's config.json without its
installer section, the proxy configuration and splash from flash-boot, the backup. Nothing
on the path is mocked. The host reads the disk's partition table with sfdisk before the boot
(it must be the legacy spec's, sector for sector) and after it (the resinOS image's).

The oldtools scenario (`migrate(OLDTOOLS_SPEC, workdir, old_tools=True)`) is a device of an
old release: its disk laid out in DOS cylinders as fdisk made it before about 2010 (p1 at
sector 63, GRUB's core.img embedded in the 62 sectors before it, the logical swap 63 sectors
into a cylinder-aligned extended partition), no sfdisk and no lsblk at all (removed in the
guest before stage 1, which the guest's log must show), and the runtime run under LANG=C
with LC_ALL and PYTHONUTF8 unset, as a service or a cron job runs it.

The fallback scenario corrupts backup.tgz on flash-data after stage 1: stage 2 refuses and
reboots, the legacy system comes back by itself, `status` shows stage 2's reason, and
`rollback` restores the swap, which is active again after a further reboot.

The static scenario (`migrate(spec, workdir, network=StaticNetwork())`) gives the legacy
device an ifupdown configuration: ethernet with a static address and a WPA-PSK WiFi network,
each with its MAC (`hwaddress`). After the run the migrated disk's resin-boot must hold their
NetworkManager keyfiles (read with mtools, parsed with configparser), flash-data the same
files with mode 0600, and the WiFi key must appear in no log: neither serial port (the
runtime's output, `plan --json` included), nor stage 1's and stage 2's logs on flash-data,
nor /resin-migrate.log on resin-boot.
"""

from __future__ import annotations

import configparser
import hashlib
import ipaddress
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from builder.progress import Progress
from builder.repack import BuildOptions, build
from tests.releases import Release
from tests.rig.bootable import BootResult, boot, bootable_legacy_image
from tests.rig.bootimages import (
    FLASHER_RELEASE,
    MIGRATOR_MARKER,
    PROXY_CONF,
    ResinosReport,
    cached_bootable_flasher,
    cached_bootable_resinos,
    parse_report,
)
from tests.rig.legacy import (
    APPDATA_DIR,
    BACKUP_VOLUME,
    Alignment,
    LegacySpec,
    SwapPlacement,
    attached,
    backup_script_text,
    mounted_root,
    partitions,
    restored_files,
)
from tests.tools import blkid, sfdisk_partitions, sh

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "tests" / "data" / "config.json"
GUEST_BUNDLE = "/root/bundle"
GUEST_BACKUP_SCRIPT = "/root/backup.sh"
AUTORUN_DONE = "/var/lib/resin-migrate-autorun.done"
RUNTIME = f"python3 {GUEST_BUNDLE}/resin-migrate.pyz"

# Milestones in the serial logs, in the order a migration passes them.
MILESTONES = (
    ("stage 1", "E2E stage1 start"),
    ("reboot into the flasher", "rebooting into the flasher"),
    ("flasher boot", "resin-migrate stage 2 starting"),
    ("stage 2 checks", "all checks passed"),
    ("stage 2 write", "first 4 MiB written and read back"),
    ("resinOS boot", "RESINOS-REPORT start"),
    ("resinOS report", "RESINOS-REPORT end"),
)

STAGE1_EXIT = "E2E stage1 exit="
#: The oldtools scenario's legacy disk, and what it removes from the guest before stage 1.
OLDTOOLS_SPEC = LegacySpec(placement=SwapPlacement.LOGICAL, alignment=Alignment.CYLINDER)
OLD_TOOLS = ("sfdisk", "lsblk")
OLD_TOOLS_LOCALE = "E2E locale: LANG=C LC_ALL=unset PYTHONUTF8=unset"

# The oldtools scenario: the guest without OLD_TOOLS (from every directory of PATH, so that
# neither the shell nor the runtime finds them), saying so, and the runtime run under LANG=C
# as a service or cron job runs it (LC_ALL, the other LC_* and PYTHONUTF8 unset). The
# interpreter's view is printed too: Python 3.7+ coerces the C locale to UTF-8 (PEP 538,
# 540) where an older one would decode ASCII.
OLD_TOOLS_PREAMBLE = f"""\
for tool in {' '.join(OLD_TOOLS)}; do
    for dir in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
        rm -f "$dir/$tool"
    done
done
hash -r
for tool in {' '.join(OLD_TOOLS)}; do
    echo "E2E tool $tool: $(command -v "$tool" || echo absent)"
done
export LANG=C
unset LC_ALL LC_CTYPE LC_MESSAGES LC_COLLATE LANGUAGE PYTHONUTF8 PYTHONIOENCODING
echo "E2E locale: LANG=$LANG LC_ALL=${{LC_ALL-unset}} PYTHONUTF8=${{PYTHONUTF8-unset}}"
echo "E2E python3 under LANG=C: $(python3 -c 'import locale, sys
print(sys.version.split()[0], locale.getpreferredencoding(False),
      "utf8_mode=%d" % sys.flags.utf8_mode)')"
"""


#: Written into the app's data while stage 1 writes flash-rootA, long after it started: the
#: backup, taken last, must carry it into resinOS's volume.
LATE_FILE = "late.txt"
LATE_TEXT = b"written while stage 1 was writing the flasher\n"
LATE_SAID = "E2E late file written"
LATE_WRITER = f"""\
( while ! grep -q "step write:flash-rootA" /var/log/resin-migrate.log 2>/dev/null; do
      sleep 0.5
  done
  printf '%s\\n' "{LATE_TEXT.decode().strip()}" > /{APPDATA_DIR}/{LATE_FILE} && sync &&
      echo "{LATE_SAID}" ) &
"""


def migrate_script(*, plan_json: bool = False, old_tools: bool = False) -> str:
    """The legacy guest's autorun script for migrate(): check, then stage 1 with --reboot.
    A failed stage 1 prints its exit code and powers the guest off (no wait for the
    timeout; not while the reboot stage 1 asked for is under way).

    plan_json: also `plan --json` (the static scenario: it must show the carried
    connections and never the WiFi key). old_tools: OLD_TOOLS_PREAMBLE first."""
    return "".join([
        "set -u\n",
        'echo "E2E stage1 start"\n',
        OLD_TOOLS_PREAMBLE if old_tools else "",
        f"{RUNTIME} check\n",
        f"{RUNTIME} plan --json\n" if plan_json else "",
        LATE_WRITER,
        f"{RUNTIME} stage1 --yes --reboot --backup-script {GUEST_BACKUP_SCRIPT}\n",
        "code=$?\n",
        f'echo "{STAGE1_EXIT}$code"\n',
        '[ "$code" = 0 ] || [ "$(systemctl is-system-running)" = stopping ] || poweroff\n',
    ])


FALLBACK_SCRIPT = f"""\
set -u
rearm() {{ rm -f {AUTORUN_DONE}; sync; }}
if [ ! -e /root/e2e-phase1 ]; then
    touch /root/e2e-phase1
    echo "E2E stage1 start"
    {RUNTIME} stage1 --yes --backup-script {GUEST_BACKUP_SCRIPT} || exit 1
    data=$(blkid -c /dev/null -L flash-data)
    mkdir -p /mnt/e2e && mount "$data" /mnt/e2e || exit 1
    python3 -c "
import sys
path = '/mnt/e2e/backup.tgz'
with open(path, 'r+b') as f:
    f.seek(-100, 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 1]))
"
    umount /mnt/e2e
    echo "E2E corrupted backup.tgz on flash-data; rebooting into the flasher"
    rearm
    reboot
elif [ ! -e /root/e2e-phase2 ]; then
    touch /root/e2e-phase2
    echo "E2E back in the legacy system"
    {RUNTIME} status
    {RUNTIME} rollback || echo "E2E rollback failed"
    rearm
    reboot
else
    echo "E2E after rollback and reboot"
    echo "E2E swaps: $(swapon --show=NAME --noheadings | tr '\\n' ' ')"
    echo "E2E fstab swap: $(awk '$3 == "swap" {{print $1}}' /etc/fstab)"
    {RUNTIME} status
    echo "E2E done"
    poweroff
fi
"""


class E2EError(AssertionError):
    """The migration did not end as expected; says in which phase, with the serial tails."""

    def __init__(self, phase: str, problem: str, result: BootResult | None) -> None:
        tails = ""
        if result is not None:
            tails = ("\n--- serial0 (console), last lines ---\n"
                     + "\n".join(line for _, line in result.serial0[-40:])
                     + "\n--- serial1 (autorun script), last lines ---\n"
                     + "\n".join(line for _, line in result.serial1[-40:]))
        super().__init__(f"end-to-end failed in phase '{phase}': {problem}{tails}")
        self.phase = phase
        self.problem = problem
        self.result = result


@dataclass(frozen=True)
class StaticNetwork:
    """The legacy device's network for the static scenario, as ifupdown describes it.

    The legacy root has neither ifupdown nor iproute2 (tests/rig/rootfs.py) and the VM no
    NIC: the runtime reads the files (its live state is empty), and each MAC comes from the
    stanza's `hwaddress`, as on a device whose interface is down or renamed."""

    interface: str = "ens3"
    mac: str = "52:54:00:12:34:56"
    address: str = "192.168.77.10"
    prefix: int = 24
    gateway: str = "192.168.77.1"
    dns: tuple[str, ...] = ("192.168.77.53", "192.168.77.54")
    search: str = "e2e.example"
    wifi_interface: str = "wlan0"
    wifi_mac: str = "52:54:00:12:34:57"
    ssid: str = "resin-migrate-e2e"
    psk: str = "e2e-wifi-secret-5d8c1f27"  # must show up in the WiFi keyfile and nowhere else

    @property
    def netmask(self) -> str:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{self.prefix}").netmask)

    def interfaces(self) -> str:
        """/etc/network/interfaces as Ubuntu 14.04 writes a static setup (netmask, not CIDR)."""
        return (f"# written by tests/e2e.py: the static scenario\n"
                f"auto lo\niface lo inet loopback\n\n"
                f"auto {self.interface}\niface {self.interface} inet static\n"
                f"    hwaddress ether {self.mac.lower()}\n"
                f"    address {self.address}\n    netmask {self.netmask}\n"
                f"    gateway {self.gateway}\n"
                f"    dns-nameservers {' '.join(self.dns)}\n    dns-search {self.search}\n\n"
                f"allow-hotplug {self.wifi_interface}\n"
                f"iface {self.wifi_interface} inet dhcp\n"
                f"    hwaddress ether {self.wifi_mac.lower()}\n"
                f'    wpa-ssid "{self.ssid}"\n    wpa-psk "{self.psk}"\n')

    @property
    def files(self) -> dict[str, str]:
        return {"/etc/network/interfaces": self.interfaces()}

    @property
    def keyfile_names(self) -> tuple[str, str]:
        """(ethernet, WiFi): the names the runtime gives them (resin-migrate-IFACE)."""
        return f"resin-migrate-{self.interface}", f"resin-migrate-{self.wifi_interface}"


Table = dict[int, tuple[int, int, str, bool]]  # number -> (start, size, type, bootable)


@dataclass
class E2EResult:
    boot: BootResult
    report: ResinosReport | None
    times: dict[str, float] = field(default_factory=dict)   # milestone -> seconds
    keyfiles: dict[str, configparser.ConfigParser] = field(default_factory=dict)
    tables: dict[str, Table] = field(default_factory=dict)  # "legacy", "final": sfdisk's

    def durations(self) -> dict[str, float]:
        t = self.times
        spans = {
            "stage 1": ("stage 1", "reboot into the flasher"),
            "flasher boot": ("reboot into the flasher", "flasher boot"),
            "stage 2 (checks and write)": ("flasher boot", "stage 2 write"),
            "first resinOS boot": ("stage 2 write", "resinOS report"),
            "downtime": ("reboot into the flasher", "resinOS report"),
        }
        return {name: t[b] - t[a] for name, (a, b) in spans.items() if a in t and b in t}

    def summary(self) -> str:
        return "\n".join(f"  {name:<28} {seconds:7.1f} s"
                         for name, seconds in self.durations().items())


def milestone_times(result: BootResult) -> dict[str, float]:
    times = {}
    for name, needle in MILESTONES:
        found = result.first(needle)
        if found is not None:
            times[name] = found
    return times


def last_phase(times: dict[str, float]) -> str:
    """The phase under way when the run stopped: the one after the last milestone seen."""
    names = [name for name, _ in MILESTONES]
    reached = [name for name in names if name in times]
    if not reached:
        return "legacy boot"
    index = names.index(reached[-1])
    return names[index + 1] if index + 1 < len(names) else "after the report"


def legacy_for(release: Release) -> LegacySpec:
    """A legacy disk whose swap area starts after the release's resinOS image ends (the
    runtime refuses an image that would overwrite the flash partitions): the default one,
    or one with a 2.5 GiB root for the large images (2.12's 1 GiB resin-data, the -ext
    rows' 1000 MiB root partitions)."""
    image_mib = cached_bootable_resinos(release).stat().st_size >> 20
    default = LegacySpec()
    if image_mib < default.root_mib:
        return default
    return LegacySpec(disk_mib=4096, root_mib=2560)


def fleet_config(release: Release) -> dict:
    """The fleet's config.json for the release's device type: tests/data/config.json's, with
    the row's deviceType (genericx86-64-ext for the -ext rows)."""
    return {**json.loads(CONFIG.read_text()), "deviceType": release.slug}


def build_bundle(workdir: Path, release: Release = FLASHER_RELEASE, quiet: bool = True) -> Path:
    out = workdir / "bundle"
    config = workdir / "config.json"
    config.write_text(json.dumps(fleet_config(release), indent=2) + "\n")
    build(BuildOptions(image=cached_bootable_flasher(release), out=out, config=config,
                       force=True), Progress(quiet=quiet))
    return out


def prepare_disk(spec: LegacySpec, bundle: Path, workdir: Path,
                 files: dict[str, str] | None = None) -> Path:
    """A throwaway copy of the bootable legacy disk holding the bundle and a backup script,
    and files (guest path -> text, mode 0600) when given. The cached image is not touched."""
    disk = workdir / "legacy.img"
    subprocess.run(["cp", "--sparse=always", str(bootable_legacy_image(spec)), str(disk)],
                   check=True)
    with attached(disk, spec) as dev, mounted_root(dev) as root:
        shutil.copytree(bundle, root / GUEST_BUNDLE.lstrip("/"))
        script = root / GUEST_BACKUP_SCRIPT.lstrip("/")
        script.write_text(backup_script_text(f"/{APPDATA_DIR}"))
        script.chmod(0o755)
        for guest_path, text in (files or {}).items():
            target = root / guest_path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            target.chmod(0o600)
    return disk


def ended(result: BootResult, awaited: str) -> str:
    """How the boot ended, in words, for a progress line; awaited: what its until marker
    means."""
    return {"poweroff": "the guest powered off", "timeout": "timed out", "marker": awaited,
            "cut": "the power was cut"}.get(result.reason, result.reason)


class Steps:
    """Says each step as it starts and, when the next one starts or end() is called, how long
    the one before took: a live account of a run that takes minutes (invoke demo, e2e)."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.name = ""
        self.started = 0.0

    def start(self, name: str, detail: str = "") -> None:
        self.end()
        self.name, self.started = name, time.monotonic()
        self.say(f"{name}{f' ({detail})' if detail else ''} ...")

    def end(self, outcome: str = "") -> None:
        """Says the step's end: "done in N s", or outcome: "timed out after N s"."""
        if self.name:
            seconds = time.monotonic() - self.started
            self.say(f"{self.name}: {outcome} after {seconds:.0f} s" if outcome else
                     f"{self.name}: done in {seconds:.0f} s")
            self.name = ""


class PhasePrinter:
    """Says each MILESTONES marker as it arrives on a serial port: the seconds since QEMU
    started, the time since the marker before it (the phase that has ended) and the phase
    that begins."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.next = 0
        self.seen = 0.0

    def __call__(self, seconds: float, line: str) -> None:
        while self.next < len(MILESTONES) and MILESTONES[self.next][1] in line:
            name = MILESTONES[self.next][0]
            since = (f", {seconds - self.seen:.0f} s after {MILESTONES[self.next - 1][0]}"
                     if self.next else "")
            self.next += 1
            self.seen = seconds
            after = (f"; next: {MILESTONES[self.next][0]}" if self.next < len(MILESTONES)
                     else "")
            self.say(f"{seconds:4.0f} s  {name}{since}{after}")


def migrate(spec: LegacySpec, workdir: Path, timeout: float = 1800,
            network: StaticNetwork | None = None,
            release: Release = FLASHER_RELEASE, old_tools: bool = False,
            progress: Callable[[str], None] | None = None) -> E2EResult:
    """Migrate a legacy VM of this layout end to end with the bootable flasher of release;
    E2EError unless the legacy disk's table is spec's before the boot, resinOS reports what
    check_report lists and the disk's table is then the resinOS image's (check_tables, read
    by sfdisk on the host). With network, the legacy device is configured so (see
    StaticNetwork) and its keyfiles must be on the migrated resin-boot, its WiFi key in no
    log (check_network). With old_tools, the guest has no OLD_TOOLS and runs the runtime
    under LANG=C (OLD_TOOLS_PREAMBLE), and its log must say so (check_old_tools).
    progress(text): told of each step as it starts and ends, and of each phase of the
    boot."""
    say = progress or (lambda text: None)
    steps = Steps(say)
    steps.start("building the bundle", f"the {release.name} flasher")
    bundle = build_bundle(workdir, release)
    steps.start("preparing the disk", "the bootable legacy disk, with the bundle and the "
                "backup script")
    disk = prepare_disk(spec, bundle, workdir, network.files if network else None)
    legacy_table = check_legacy_table(spec, disk)
    # where flash-data will be: the old swap area (from the start without a swap partition)
    swap_start = _partition_extents(disk).get(spec.swap_number or 0, (0, 0))[0]
    steps.start("the migration in the VM", f"QEMU, software emulation; serial logs in "
                f"{workdir}; next: {MILESTONES[0][0]}")
    result = boot(disk, autorun=migrate_script(plan_json=network is not None,
                                               old_tools=old_tools),
                  timeout=timeout, until="RESINOS-REPORT end", log_dir=workdir,
                  on_line=PhasePrinter(say) if progress else None)
    steps.end(ended(result, "resinOS reported"))
    steps.start("checking the disk")
    times = milestone_times(result)
    if old_tools and "stage 1" in times:
        check_old_tools(result)
    if "resinOS report" not in times:
        exit_line = next((line for _, line in result.serial1 if line.startswith(STAGE1_EXIT)),
                         "")
        if exit_line and exit_line != f"{STAGE1_EXIT}0":
            fails = [line for _, line in result.serial1 if line.startswith("FAIL")]
            raise E2EError("stage 1", f"stage 1 exited with {exit_line[len(STAGE1_EXIT):]} "
                           f"and the guest powered off; check: {'; '.join(fails) or '-'}",
                           result)
        raise E2EError(last_phase(times), f"no resinOS report ({result.reason} after "
                                          f"{result.seconds:.0f} s)", result)
    report = parse_report(result.serial0_text)
    check_report(report, result, release)
    final_table = check_tables(disk, release, result)
    check_secrets_wiped(disk, legacy_table[spec.swap_number or 0], release, network, result)
    keyfiles = check_network(network, disk, swap_start, result) if network else {}
    steps.end()
    return E2EResult(boot=result, report=report, times=times, keyfiles=keyfiles,
                     tables={"legacy": legacy_table, "final": final_table})


def _table(disk: Path) -> Table:
    """The disk's partition table as sfdisk reads it on the host, in sectors."""
    return {number: (part.start, part.size, part.type, part.bootable)
            for number, part in sfdisk_partitions(disk).items()}


def table_text(table: Table) -> str:
    return ", ".join(f"p{n} {start}+{size} type {kind}{' boot' if boot else ''}"
                     for n, (start, size, kind, boot) in sorted(table.items()))


def check_legacy_table(spec: LegacySpec, disk: Path) -> Table:
    """The legacy disk's table before the boot, read by sfdisk: partitions(spec), sector for
    sector (with Alignment.CYLINDER: p1 at sector 63, the logical swap 63 sectors after the
    extended partition's start). E2EError otherwise; returns the table."""
    found = _table(disk)
    wanted = {p.number: (p.start, p.size, p.type, p.bootable) for p in partitions(spec)}
    if found != wanted:
        raise E2EError("legacy disk", f"sfdisk reads {table_text(found)}; the spec is "
                       f"{table_text(wanted)}", None)
    return found


def check_secrets_wiped(disk: Path, swap: tuple[int, int, str, bool], release: Release,
                        network: StaticNetwork | None, result: BootResult) -> None:
    """No secret left in the former swap area, where flash-boot and flash-data were and
    resin-data grows over: not the fleet's API key, not the WiFi key, not a piece of the
    backup (4 KiB from the middle of backup.tgz, as resinOS's resin-data holds it)."""
    secrets = {"the fleet's API key": fleet_config(release)["apiKey"].encode()}
    if network is not None:
        secrets["the WiFi key"] = network.psk.encode()
    data_at, _ = max(_partition_extents(disk).values())     # resin-data: the last one
    archive = sh("debugfs", "-R", "cat /backup.tgz", f"{disk}?offset={data_at}",
                 check=False).stdout
    if len(archive) < 16384:
        raise E2EError("secrets", f"resin-data holds no backup.tgz ({len(archive)} bytes)",
                       result)
    secrets["a piece of backup.tgz"] = archive[len(archive) // 2:len(archive) // 2 + 4096]
    start, size = swap[0] * SECTOR, swap[1] * SECTOR
    longest = max(len(value) for value in secrets.values())
    found: set[str] = set()
    with disk.open("rb") as handle:
        offset = start
        while offset < start + size:
            handle.seek(offset)
            data = handle.read(min(8 << 20, start + size - offset) + longest)
            found.update(name for name, value in secrets.items() if value in data)
            offset += 8 << 20
    if found:
        raise E2EError("secrets", f"the former swap area still holds {', '.join(sorted(found))}",
                       result)


def check_tables(disk: Path, release: Release, result: BootResult) -> Table:
    """After the migration the disk's table (sfdisk on the host) is the resinOS image's,
    partition for partition: stage 2 wrote its boot records. E2EError otherwise."""
    found = _table(disk)
    image = _table(cached_bootable_resinos(release))
    if found != image:
        raise E2EError("migrated table", f"the migrated disk's table is {table_text(found)}; "
                       f"the resinOS image's is {table_text(image)}", result)
    return found


def check_old_tools(result: BootResult) -> None:
    """The guest's log says OLD_TOOLS were gone before stage 1 and the runtime ran under
    LANG=C (OLD_TOOLS_PREAMBLE); E2EError otherwise (the scenario would prove nothing)."""
    lines = [line for _, line in result.serial1]
    problems = [f"the guest did not report {tool} absent before stage 1"
                for tool in OLD_TOOLS if f"E2E tool {tool}: absent" not in lines]
    if OLD_TOOLS_LOCALE not in lines:
        problems.append(f"no {OLD_TOOLS_LOCALE!r} line before stage 1")
    if problems:
        raise E2EError("stage 1", "; ".join(problems), result)


def check_report(report: ResinosReport, result: BootResult, release: Release,
                 late_said: bool = True) -> None:
    """What the migrated device must show: resinOS's labels, the fleet's config.json without
    its installer section, flash-boot's proxy configuration and splash, the backup of
    /srv/appdata file by file with LATE_FILE (written while stage 1 ran: the guest said so
    on serial1 unless not late_said; the fleet scenario writes it by --before-backup), and
    stage 2's log on resin-boot; and on the way, that the flasher's migrator declined (where
    the row has one) and its own flashing and registration never ran."""
    problems = []
    wanted_labels = {"resin-boot", "resin-rootA", "resin-rootB", "resin-state", "resin-data"}
    if not wanted_labels <= set(report.labels):
        problems.append(f"labels {report.labels}, expected {sorted(wanted_labels)}")
    fleet = fleet_config(release)
    try:
        config = json.loads(report.first("config_json") or "null")
    except ValueError:
        config = None
    if "installer" not in fleet:
        problems.append(f"{CONFIG} has no installer section: the check proves nothing")
    if fleet["deviceType"] != release.slug:
        problems.append(f"the fleet's deviceType {fleet['deviceType']} is not {release.slug}")
    if config != {key: value for key, value in fleet.items() if key != "installer"}:
        problems.append(f"resin-boot's config.json is {config}, expected the fleet's without "
                        "its installer section")
    boot_files = report.files("boot_file")
    if boot_files.get("system-proxy/redsocks.conf") != hashlib.sha256(PROXY_CONF).hexdigest():
        problems.append(f"no system-proxy/redsocks.conf from flash-boot on resin-boot "
                        f"(found {sorted(boot_files)})")
    if not any(name.startswith("splash/") for name in boot_files):
        problems.append("no splash/ from flash-boot on resin-boot")
    files = report.files("volume_file_sha256")
    expected = restored_files()
    # migrate_script's writer: a file the backup taken last must hold
    expected[f"{BACKUP_VOLUME}/{LATE_FILE}"] = hashlib.sha256(LATE_TEXT).hexdigest()
    if late_said and not any(line == LATE_SAID for _, line in result.serial1):
        problems.append("the guest never wrote the late file into the app's data")
    if files != expected:
        problems.append(f"the volumes restored from backup.tgz hold {files}, expected "
                        f"/srv/appdata in {BACKUP_VOLUME}/: {expected}")
    problems += [f"backup.tgz: {line}" for line in report.all("restore_error")]
    if report.first("migrate_log") != "yes":
        problems.append("no /resin-migrate.log on resin-boot")
    console = result.serial0_text
    if release.migrator and f"{MIGRATOR_MARKER} not enabled" not in console:
        problems.append("the flasher's initramfs migrator did not say it declined")
    for line in ("resin-device-register: cannot reach", "resin-init-flasher: no internal device"):
        if line in console:
            problems.append(f"the flasher's own unit ran: {line!r} on the console")
    if problems:
        raise E2EError("resinOS report", "; ".join(problems), result)


SECTOR = 512
EXT4_MAGIC = b"\x53\xef"
FLASH_DATA_LABEL = b"flash-data".ljust(16, b"\0")  # s_volume_name, NUL padded


def _partition_extents(disk: Path) -> dict[int, tuple[int, int]]:
    """number -> (start, size) in bytes, from the disk's partition table (sfdisk)."""
    return {number: (part.offset, part.nbytes)
            for number, part in sfdisk_partitions(disk).items()}


def _find_resin_boot(disk: Path) -> int:
    """The byte offset of the FAT filesystem labelled resin-boot in the disk's table."""
    for start, size in _partition_extents(disk).values():
        if blkid(disk, start, size).get("LABEL") == "resin-boot":
            return start
    raise LookupError(f"{disk}: no partition labelled resin-boot in its table")


def _find_flash_data(disk: Path, start: int) -> int | None:
    """The byte offset of the ext4 filesystem labelled flash-data at or after start (the old
    swap area): the migrated disk's table no longer names it, so its superblock is looked for
    (s_magic at 0x38, s_volume_name at 0x78, 1024 bytes into the filesystem)."""
    chunk = 8 << 20
    with disk.open("rb") as handle:
        offset = start
        while True:
            handle.seek(offset)
            data = handle.read(chunk + 4096)
            if len(data) < 1024 + 0x78 + len(FLASH_DATA_LABEL):
                return None
            at = data.find(FLASH_DATA_LABEL)
            while 0 <= at < chunk:
                fs_start = offset + at - 0x78 - 1024
                magic_at = at - 0x78 + 0x38
                if fs_start % SECTOR == 0 and magic_at >= 0 and \
                        data[magic_at:magic_at + 2] == EXT4_MAGIC:
                    return fs_start
                at = data.find(FLASH_DATA_LABEL, at + 1)
            offset += chunk


def _parse_keyfile(name: str, text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys as written
    parser.read_string(text, source=name)
    return parser


def _keyfile_problems(net: StaticNetwork, keyfiles: dict[str, configparser.ConfigParser]
                      ) -> list[str]:
    """What the keyfiles on resin-boot lack compared with the legacy configuration."""
    ether_name, wifi_name = net.keyfile_names
    problems = []
    for name in (ether_name, wifi_name):
        if name not in keyfiles:
            problems.append(f"no system-connections/{name} (found: {sorted(keyfiles)})")
    wanted: dict[str, dict[tuple[str, str], str]] = {
        ether_name: {
            ("connection", "id"): ether_name, ("connection", "type"): "ethernet",
            ("ethernet", "mac-address"): net.mac.upper(),
            ("ipv4", "method"): "manual",
            ("ipv4", "address1"): f"{net.address}/{net.prefix},{net.gateway}",
            ("ipv4", "dns"): "".join(server + ";" for server in net.dns),
            ("ipv4", "dns-search"): net.search + ";",
        },
        wifi_name: {
            ("connection", "id"): wifi_name, ("connection", "type"): "wifi",
            ("wifi", "ssid"): net.ssid, ("wifi", "mac-address"): net.wifi_mac.upper(),
            ("wifi-security", "key-mgmt"): "wpa-psk", ("wifi-security", "psk"): net.psk,
            ("ipv4", "method"): "auto",
        },
    }
    for name, values in wanted.items():
        parsed = keyfiles.get(name)
        if parsed is None:
            continue
        for (section, key), value in values.items():
            found = parsed.get(section, key, fallback=None)
            if key == "mac-address" and found is not None:
                found = found.upper()
            if found == value:
                continue
            if key == "psk":
                problems.append(f"{name} [{section}] psk: not the legacy device's WiFi key")
            else:
                problems.append(f"{name} [{section}] {key}: {found!r}, expected {value!r}")
    return problems


def check_network(net: StaticNetwork, disk: Path, swap_start: int,
                  result: BootResult) -> dict[str, configparser.ConfigParser]:
    """The legacy device's network on the migrated disk: resin-boot holds its keyfiles
    (mtools), flash-data the same with mode 0600 (debugfs), and no log holds the WiFi key.
    Returns the parsed keyfiles of resin-boot; E2EError naming every problem found."""
    phase = "network on resin-boot"
    try:
        boot_at = _find_resin_boot(disk)
    except LookupError as exc:
        raise E2EError(phase, str(exc), result) from exc
    fat = f"{disk}@@{boot_at}"
    listing = sh("mdir", "-b", "-i", fat, "::/system-connections", check=False)
    if listing.returncode != 0:
        raise E2EError(phase, "resin-boot has no system-connections/: "
                       f"{listing.stderr.decode(errors='replace').strip()}", result)
    # *.ignore: the samples balenaOS ships there, which NetworkManager skips
    names = sorted(name for name in (line.strip().rsplit("/", 1)[-1]
                                     for line in listing.stdout.decode().splitlines())
                   if name and not name.endswith(".ignore"))
    texts = {name: sh("mcopy", "-n", "-i", fat, f"::/system-connections/{name}", "-")
             .stdout.decode() for name in names}
    problems: list[str] = []
    keyfiles = {}
    for name, text in texts.items():
        try:
            keyfiles[name] = _parse_keyfile(name, text)
        except configparser.Error as exc:
            problems.append(f"system-connections/{name} does not parse: {exc}")
    problems += _keyfile_problems(net, keyfiles)
    boot_log = sh("mcopy", "-n", "-i", fat, "::/resin-migrate.log", "-",
                  check=False).stdout.decode(errors="replace")
    for name in net.keyfile_names:
        if f"network: {name} from" not in boot_log:
            problems.append(f"/resin-migrate.log on resin-boot does not say {name} was copied")

    logs = {"serial0 (console, stage 2)": result.serial0_text,
            "serial1 (check, plan --json, stage1)": result.serial1_text,
            "/resin-migrate.log on resin-boot": boot_log}
    # flash-data's keyfiles (mode 0600 there: tests/test_network.py) are zeroed with it at
    # the end of stage 2 (check_secrets_wiped)
    if _find_flash_data(disk, swap_start) is not None:
        problems.append("flash-data is still readable in the former swap area")
    for where, text in logs.items():
        if net.psk in text:
            problems.append(f"the WiFi key appears in {where}")
    if net.ssid not in result.serial1_text:
        problems.append("plan --json and check show no WiFi network: the key check proves "
                        "nothing")
    if problems:
        raise E2EError(phase, "; ".join(problems), result)
    return keyfiles


@dataclass
class FallbackResult:
    boot: BootResult
    status_output: str
    swaps_after: str


def fallback(spec: LegacySpec, workdir: Path, timeout: float = 1800,
             progress: Callable[[str], None] | None = None) -> FallbackResult:
    """Stage 2 refuses a corrupted backup.tgz; the old system comes back, rollback restores
    the swap. E2EError unless each of those is seen. progress(text): told of each step as it
    starts and ends, and of each of the guest script's E2E lines."""
    say = progress or (lambda text: None)
    steps = Steps(say)
    steps.start("building the bundle")
    bundle = build_bundle(workdir)
    steps.start("preparing the disk")
    disk = prepare_disk(spec, bundle, workdir)
    steps.start("the VM", f"stage 1, the flasher's refusal, the legacy system, rollback; "
                f"serial logs in {workdir}")

    def script_line(seconds: float, line: str) -> None:
        if line.startswith("E2E "):
            say(f"{seconds:4.0f} s  {line[4:]}")

    result = boot(disk, autorun=FALLBACK_SCRIPT, timeout=timeout, until="E2E done",
                  log_dir=workdir, on_line=script_line if progress else None)
    steps.end(ended(result, "the guest's script finished"))
    steps.start("checking what the guest said")
    script = result.serial1_text
    console = result.serial0_text
    if "E2E corrupted backup.tgz" not in script:
        raise E2EError("stage 1", "stage 1 did not complete in the legacy system", result)
    if "backup.tgz is damaged" not in console + script:
        raise E2EError("flasher boot", "stage 2 did not refuse the damaged backup", result)
    if "E2E back in the legacy system" not in script:
        raise E2EError("fallback boot", "the legacy system did not come back", result)
    if "E2E after rollback and reboot" not in script:
        raise E2EError("rollback", "no boot after the rollback", result)
    back = script[script.index("E2E back in the legacy system"):]
    status = back[:back.index("E2E after rollback") if "E2E after rollback" in back else None]
    if "backup.tgz is damaged" not in status:
        raise E2EError("fallback boot", "status does not show stage 2's reason", result)
    swaps = next((line for _, line in result.serial1 if line.startswith("E2E swaps:")), "")
    if "/dev/sda" not in swaps:
        raise E2EError("rollback", f"swap not active after rollback and reboot: {swaps!r}",
                       result)
    steps.end()
    return FallbackResult(boot=result, status_output=status, swaps_after=swaps)
