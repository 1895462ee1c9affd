"""The end-to-end migration of a legacy Debian VM to the resinOS stand-in, as one run.

    result = migrate(LegacySpec(), workdir)          # raises E2EError naming the phase
    print(result.summary())

The bootable flasher (tests.rig.bootimages) goes through `invoke build-flasher`'s code; the
bundle and a backup script are copied onto a bootable legacy disk (tests.rig.bootable);
QEMU boots it by BIOS and stays up across the guest's reboots: the legacy system runs
`resin-migrate.pyz stage1 --yes --reboot`, GRUB's one-shot entry boots the flasher from
the former swap area, stage 2 writes resinOS and reboots, the resinOS stand-in reports on
the serial console and powers off. Nothing on the path is mocked.

The fallback scenario corrupts backup.tgz on flash-data after stage 1: stage 2 refuses and
reboots, the legacy system comes back by itself, `status` shows stage 2's reason, and
`rollback` restores the swap, which is active again after a further reboot.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from builder.progress import Progress
from builder.repack import BuildOptions, build
from tests.rig.bootable import BootResult, boot, bootable_legacy_image
from tests.rig.bootimages import ResinosReport, cached_bootable_flasher, parse_report
from tests.rig.legacy import APPDATA_DIR, LegacySpec, appdata_files, attached, mounted_root

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

MIGRATE_SCRIPT = f"""\
set -u
echo "E2E stage1 start"
{RUNTIME} check
{RUNTIME} stage1 --yes --reboot --backup-script {GUEST_BACKUP_SCRIPT}
echo "E2E stage1 exit=$?"
"""

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


@dataclass
class E2EResult:
    boot: BootResult
    report: ResinosReport | None
    times: dict[str, float] = field(default_factory=dict)   # milestone -> seconds

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


def build_bundle(workdir: Path, quiet: bool = True) -> Path:
    out = workdir / "bundle"
    build(BuildOptions(image=cached_bootable_flasher(), out=out, config=CONFIG, force=True),
          Progress(quiet=quiet))
    return out


def prepare_disk(spec: LegacySpec, bundle: Path, workdir: Path) -> Path:
    """A throwaway copy of the bootable legacy disk holding the bundle and a backup script."""
    disk = workdir / "legacy.img"
    subprocess.run(["cp", "--sparse=always", str(bootable_legacy_image(spec)), str(disk)],
                   check=True)
    with attached(disk, spec) as dev, mounted_root(dev) as root:
        shutil.copytree(bundle, root / GUEST_BUNDLE.lstrip("/"))
        script = root / GUEST_BACKUP_SCRIPT.lstrip("/")
        script.write_text(f'#!/bin/sh\nset -e\ncp -a /{APPDATA_DIR}/. "$1/"\n')
        script.chmod(0o755)
    return disk


def migrate(spec: LegacySpec, workdir: Path, timeout: float = 1800) -> E2EResult:
    """Migrate a legacy VM of this layout end to end; E2EError unless resinOS reports the
    fleet's config.json and the backup of /srv/appdata byte for byte."""
    bundle = build_bundle(workdir)
    disk = prepare_disk(spec, bundle, workdir)
    result = boot(disk, autorun=MIGRATE_SCRIPT, timeout=timeout, until="RESINOS-REPORT end",
                  log_dir=workdir)
    times = milestone_times(result)
    if "resinOS report" not in times:
        raise E2EError(last_phase(times), f"no resinOS report ({result.reason} after "
                                          f"{result.seconds:.0f} s)", result)
    report = parse_report(result.serial0_text)
    check_report(report, result)
    return E2EResult(boot=result, report=report, times=times)


def check_report(report: ResinosReport, result: BootResult) -> None:
    """What the migrated device must show: resinOS's labels, the fleet's config.json, the
    backup of /srv/appdata file by file, and stage 2's log on resin-boot."""
    problems = []
    wanted_labels = {"resin-boot", "resin-rootA", "resin-rootB", "resin-state", "resin-data"}
    if not wanted_labels <= set(report.labels):
        problems.append(f"labels {report.labels}, expected {sorted(wanted_labels)}")
    config_sha = hashlib.sha256(CONFIG.read_bytes()).hexdigest()
    if report.first("config_sha256") != config_sha:
        problems.append(f"config.json sha256 {report.first('config_sha256')}, "
                        f"expected the fleet's {config_sha}")
    files = {}
    for value in report.all("backup_file_sha256"):
        digest, _, name = value.partition(" ")
        files[name] = digest
    expected = {name: hashlib.sha256(data).hexdigest() for name, data in appdata_files().items()}
    if files != expected:
        problems.append(f"backup.tgz holds {files}, expected /srv/appdata: {expected}")
    if report.first("migrate_log") != "yes":
        problems.append("no /resin-migrate.log on resin-boot")
    if problems:
        raise E2EError("resinOS report", "; ".join(problems), result)


@dataclass
class FallbackResult:
    boot: BootResult
    status_output: str
    swaps_after: str


def fallback(spec: LegacySpec, workdir: Path, timeout: float = 1800) -> FallbackResult:
    """Stage 2 refuses a corrupted backup.tgz; the old system comes back, rollback restores
    the swap. E2EError unless each of those is seen."""
    bundle = build_bundle(workdir)
    disk = prepare_disk(spec, bundle, workdir)
    result = boot(disk, autorun=FALLBACK_SCRIPT, timeout=timeout, until="E2E done",
                  log_dir=workdir)
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
    return FallbackResult(boot=result, status_output=status, swaps_after=swaps)
