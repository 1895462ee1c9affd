"""Power cuts and hangs at every instant of a migration, in the VM (`invoke e2e --scenario
powercut`, a handful in the default test run).

    outcome = run_instant(instants(inner)["stage 2: body write 50%"], bundle, workdir)
    print(table([outcome]))

A power cut kills QEMU (SIGKILL) at an instant chosen by a marker the guest prints, plus,
where given, a number of bytes the guest has written to its disk since (QEMU's own count,
over QMP): see tests.imaging.Cut. QEMU then starts again on the same disk, with the same
autorun script and nothing else changed, and the run must end unattended in one of two
ways:

- resinOS: the stand-in's report, with the fleet's config.json (installer section gone) and
  the backup of /srv/appdata file by file;
- the old system: its autorun script (run at every boot of it, see AUTORUN_SCRIPT) finds
  stage 1 started, runs `status`, which must give a reason, and `rollback`, after which
  the swap partition must be active again and named in /etc/fstab.

A hang is injected instead of a cut: a stage 2 fault point (stage2.faults on flash-data,
see runtime/resin-migrate-stage2's fault_point), or an edit of the one-shot GRUB entry (a
kernel GRUB cannot load, a root the kernel cannot find); nothing is cut, and the run must
end the same two ways by itself.

The table gives, for each instant, what the first boot after it started (legacy, flasher,
resinOS), the outcome, and the seconds from the cut (or the hang's start) to the outcome.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from runtime.manifest import InnerImage
from runtime.stage2names import WRITE_TRIES
from tests.e2e import (
    AUTORUN_DONE,
    GUEST_BACKUP_SCRIPT,
    RUNTIME,
    E2EError,
    fleet_config,
    prepare_disk,
)
from tests.imaging import BootResult, Cut
from tests.releases import Release
from tests.rig.bootable import START_MARKER, boot
from tests.rig.bootimages import FLASHER_RELEASE, parse_report
from tests.rig.legacy import APPDATA_DIR, LegacySpec, restored_files

# Markers: the autorun script's own lines (ttyS1), the runtime's log (ttyS1), stage 2's log
# (the console, ttyS0, through /dev/kmsg), the stand-in's report.
RESINOS_END = "RESINOS-REPORT end"
LEGACY_END = "E2E legacy done"
LEGACY_BACK = "E2E back in the legacy system"
STAGE2_START = "resin-migrate stage 2 starting"
RESINOS_START = "RESINOS-REPORT start"
MiB = 1 << 20
HEAD_BYTES = 4 * MiB       # the image's first 4 MiB, written last


@dataclasses.dataclass(frozen=True)
class Instant:
    """One instant of the matrix: a power cut (cut) or a hang (faults or a kernel argument
    that makes the flasher's root unfindable), and where the hang starts (hang_marker)."""

    name: str
    cut: Cut | None = None
    faults: str | None = None            # stage2.faults, written on flash-data by stage 1's run
    grub_edit: str | None = None         # a sed expression for the one-shot entry's grub.cfg
    stage2_timeout: int | None = None    # stage1 --stage2-timeout
    hang_marker: str | None = None       # where the time to recover counts from (hangs),
    hang_nth: int = 1                    # at its nth line
    default: bool = False                # in the default test run (the widest window)


def instants(inner: InnerImage | None) -> dict[str, Instant]:
    """Every instant, in the order a migration passes them, for the resinOS image the
    bundle carries (the manifest's inner_image: what stage 2 writes); None gives the names
    alone."""
    body = inner.stream_size - HEAD_BYTES if inner else 0   # what the body write writes

    def at(fraction: float) -> Cut:
        return Cut("point of no return: writing", written=int(body * fraction))

    # every write of every body extent corrupted through one boot's tries: that boot gives
    # up and reboots, the next one finds the extents wrong and writes them again
    persisting = (len(inner.extents) - 1) * (1 + WRITE_TRIES) if inner else 0
    cuts = [
        Instant("stage 1: backup tried", Cut("step swapoff")),
        Instant("stage 1: table written", Cut("step write:flash-boot")),
        Instant("stage 1: writing flash-rootA", Cut("step write:flash-rootA", written=48 * MiB)),
        Instant("stage 1: core.img written", Cut("step flash-data")),
        Instant("stage 1: flash-data written", Cut("step network")),
        Instant("stage 1: GRUB entry armed", Cut("rebooting into the flasher")),
        Instant("flasher: kernel booting", Cut("Linux version", nth=2)),
        Instant("flasher: stage 2 starting", Cut(STAGE2_START)),
        Instant("stage 2: checks (image hash)", Cut("checking the sha256 of")),
        # (stage 1's `check` also says "all checks passed": stage 2's own line)
        Instant("stage 2: checks passed", Cut("phase checks: done")),
        Instant("stage 2: sector 0 armed", Cut("every boot reaches the flasher")),
        Instant("stage 2: body write 0%", Cut("point of no return: writing")),
        Instant("stage 2: body write 25%", at(0.25)),
        Instant("stage 2: body write 50%", at(0.5), default=True),
        Instant("stage 2: body write 90%", at(0.9)),
        Instant("stage 2: read-back", Cut("phase verify: start")),
        Instant("stage 2: payload copy", Cut("config.json: the fleet's")),
        Instant("stage 2: payload read back", Cut("config.json and backup.tgz read back")),
        Instant("stage 2: head write, sector 0 not yet",
                Cut("the image's first 4 MiB but sector 0 written")),
        Instant("stage 2: head written", Cut("now boots resinOS")),
        Instant("stage 2: final reboot", Cut("stage 2 complete")),
        Instant("resinOS: first boot", Cut(RESINOS_START)),
    ]
    hangs = [
        Instant("hang: a stage 2 check blocks", faults="checks hang", stage2_timeout=60,
                hang_marker="fault point checks: hanging"),
        Instant("hang: stuck after arming sector 0", faults="arm-boot hang", stage2_timeout=60,
                hang_marker="fault point arm-boot: hanging"),
        Instant("hang: flasher entry cannot load",
                grub_edit="/resin-migrate-flasher/,/^}/s|--fs-uuid --set=root [^ ]*|"
                          "--fs-uuid --set=root 0000-0000|",
                hang_marker="E2E injected"),
        Instant("hang: flasher root not found",
                grub_edit="s|root=LABEL=flash-rootA|root=LABEL=flash-nowhere|",
                hang_marker="Linux version", hang_nth=2),
        Instant("hang: read-back mismatch persists", faults=f"write-extent corrupt {persisting}",
                hang_marker="fault point write-extent: corrupting"),
        Instant("hang: head write stalls", faults="write-head hang", stage2_timeout=60,
                hang_marker="fault point write-head: hanging"),
    ]
    return {instant.name: instant for instant in cuts + hangs}


def autorun_script(instant: Instant) -> str:
    """The legacy system's autorun, run at every boot of it: the first one runs stage 1
    (and injects the instant's faults), every later one is a return to the old system."""
    timeout = f" --stage2-timeout {instant.stage2_timeout}" if instant.stage2_timeout else ""
    inject = []
    if instant.faults:
        inject += ['data=$(blkid -c /dev/null -L flash-data)',
                   'mkdir -p /mnt/e2e && mount "$data" /mnt/e2e || exit 1',
                   f"printf '%s\\n' '{instant.faults}' > /mnt/e2e/stage2.faults",
                   "umount /mnt/e2e"]
    if instant.grub_edit:
        inject += [f"sed -i '{instant.grub_edit}' /boot/grub/grub.cfg"]
    reboot_flag = "" if inject else " --reboot"
    stage1 = f"{RUNTIME} stage1 --yes{reboot_flag}{timeout} --backup-script {GUEST_BACKUP_SCRIPT}"
    injected = "\n    ".join(inject + ['echo "E2E injected; rebooting into the flasher"',
                                       "sync", "reboot"]) if inject else ":"
    return f"""\
set -u
rm -f {AUTORUN_DONE}; sync    # every boot of the legacy system runs this script
if [ ! -e /root/e2e-started ]; then
    touch /root/e2e-started; sync
    echo "E2E stage1 start"
    {RUNTIME} check
    {stage1}
    echo "E2E stage1 exit=$?"
    {injected}
else
    echo "{LEGACY_BACK}"
    {RUNTIME} status
    echo "E2E status exit=$?"
    {RUNTIME} rollback
    echo "E2E rollback exit=$?"
    echo "E2E swaps: $(swapon --show=NAME --noheadings | tr '\\n' ' ')"
    echo "E2E fstab swap: $(awk '$3 == "swap" {{print $1}}' /etc/fstab)"
    echo "{LEGACY_END}"
    poweroff
fi
"""


@dataclasses.dataclass
class Outcome:
    instant: Instant
    next_boot: str           # what the first boot after the cut (or the hang) started
    outcome: str             # "resinOS" or "old system"
    recovery: float          # seconds from the cut (the hang's start) to the outcome
    boots: list[BootResult]

    def row(self) -> str:
        return (f"{self.instant.name:<40} {self.next_boot:<9} {self.outcome:<11} "
                f"{self.recovery:7.0f} s")


def table(outcomes: list[Outcome | str]) -> str:
    header = f"{'instant':<40} {'next boot':<9} {'outcome':<11} {'recovery':>9}"
    lines = [header, "-" * len(header)]
    lines += [item if isinstance(item, str) else item.row() for item in outcomes]
    return "\n".join(lines)


def run_instant(instant: Instant, bundle: Path, workdir: Path,
                release: Release = FLASHER_RELEASE, spec: LegacySpec | None = None,
                timeout: float = 1800) -> Outcome:
    """One migration with the instant's cut or hang; E2EError unless it ends in resinOS or
    in the old system as the module docstring says."""
    spec = spec or LegacySpec()
    disk = prepare_disk(spec, bundle, workdir)
    script = autorun_script(instant)
    # both ends power off: the stand-in after its report, the old system after rollback
    first = boot(disk, autorun=script, timeout=timeout, cut=instant.cut,
                 log_dir=workdir / "boot-1")
    boots = [first]
    if instant.cut is not None:
        if first.reason != "cut":
            raise E2EError(instant.name, f"the instant was never reached ({first.reason} "
                                         f"after {first.seconds:.0f} s)", first)
        second = boot(disk, autorun=script, timeout=timeout, log_dir=workdir / "boot-2")
        boots.append(second)
        after, since = second, 0.0
    else:
        after = first
        start = first.first_after(instant.hang_marker or "", -1.0, nth=instant.hang_nth)
        if start is None:
            raise E2EError(instant.name, f"the hang was never reached: no "
                                         f"{instant.hang_marker!r}", first)
        since = start
    outcome = _outcome(instant, after, release)
    ended = after.first(RESINOS_END if outcome == "resinOS" else LEGACY_END)
    assert ended is not None
    return Outcome(instant=instant, next_boot=_next_boot(after, since), outcome=outcome,
                   recovery=ended - since, boots=boots)


def _next_boot(result: BootResult, since: float) -> str:
    """What booted first after since: the legacy system (its autorun), the flasher (stage
    2) or resinOS (its report)."""
    seen = [(result.first_after(marker, since), name) for marker, name in (
        (START_MARKER, "legacy"), (STAGE2_START, "flasher"),
        (RESINOS_START, "resinOS"))]
    found = sorted((when, name) for when, name in seen if when is not None)
    return found[0][1] if found else "none"


def _outcome(instant: Instant, result: BootResult, release: Release) -> str:
    if result.first(RESINOS_END) is not None:
        _check_resinos(instant, result, release)
        return "resinOS"
    if result.first(LEGACY_END) is not None:
        _check_old_system(instant, result)
        return "old system"
    raise E2EError(instant.name, f"neither resinOS nor the old system ({result.reason} after "
                                 f"{result.seconds:.0f} s)", result)


def _check_resinos(instant: Instant, result: BootResult, release: Release) -> None:
    report = parse_report(result.serial0_text)
    fleet = fleet_config(release)
    config = json.loads(report.first("config_json") or "null")
    problems = []
    if config != {key: value for key, value in fleet.items() if key != "installer"}:
        problems.append(f"resin-boot's config.json is {config}")
    if report.files("volume_file_sha256") != restored_files():
        problems.append(f"the volumes restored from the backup hold "
                        f"{report.files('volume_file_sha256')}, expected /{APPDATA_DIR}")
    problems += [f"backup.tgz: {line}" for line in report.all("restore_error")]
    if problems:
        raise E2EError(instant.name, "; ".join(problems), result)


def _check_old_system(instant: Instant, result: BootResult) -> None:
    script = result.serial1_text
    back = script[script.rindex(LEGACY_BACK):]
    status = back[:back.index("E2E status exit=")]
    problems = []
    if "E2E status exit=0" not in back:
        problems.append("status failed")
    if not any(reason in status for reason in (
            "stage 1 interrupted after", "stopped in its", "stage 2 never started")):
        problems.append(f"status gives no reason: {status.strip()[-800:]!r}")
    if "E2E rollback exit=0" not in back:
        problems.append("rollback failed")
    swaps = next((line for line in back.splitlines() if line.startswith("E2E swaps:")), "")
    fstab = next((line for line in back.splitlines() if line.startswith("E2E fstab swap:")), "")
    if "/dev/sda" not in swaps:
        problems.append(f"the swap is not active after rollback: {swaps!r}")
    if fstab.split(":", 1)[-1].strip() == "":
        problems.append("/etc/fstab names no swap after rollback")
    if problems:
        raise E2EError(instant.name, "; ".join(problems), result)


def run_matrix(names: list[str], workdir: Path, keep: bool = False,
               echo: bool = True) -> list[Outcome | str]:
    """The named instants (default: every one), each on a fresh copy of the legacy disk with
    one bundle; a row per instant, "FAILED ..." for those that did not end as they must."""
    import shutil

    from runtime.manifest import load
    from tests.e2e import build_bundle

    bundle = build_bundle(workdir)
    every = instants(load(str(bundle)).inner_image)
    unknown = sorted(set(names) - set(every))
    if unknown:
        raise KeyError(f"no instant {', '.join(unknown)}; instants: {'; '.join(every)}")
    rows: list[Outcome | str] = []
    for number, (name, instant) in enumerate(every.items(), 1):
        if names and name not in names:
            continue
        work = workdir / f"instant-{number:02d}"
        work.mkdir()
        if echo:
            print(f"powercut: {name} ...", flush=True)
        try:
            outcome = run_instant(instant, bundle, work)
            rows.append(outcome)
            if echo:
                print(f"powercut: {outcome.row()}", flush=True)
        except E2EError as exc:
            rows.append(f"{name:<40} FAILED: {str(exc).splitlines()[0]}")
            if echo:
                print(f"powercut: {name}: FAILED\n{exc}", flush=True)
        finally:
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
    return rows
