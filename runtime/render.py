"""What check and plan show: the checks as text, the plan as lines and as --json fields.
The command line (__main__.py) prints them; stage1 shows the plan before its question."""

from .jsonout import check_list
from .plan import describe
from .system import partition_path

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Any  # noqa: F401  # novermin


def check_text(preflight):
    # type: (Any) -> str
    """The checks, a line each (and what is needed and what to do for a failed one), then
    the verdict."""
    lines = []
    for check in preflight.checks:
        mark = {True: "ok", False: "FAIL", None: "info"}[check.ok]
        lines.append("{:<4}  {:<18}  {}".format(mark, check.name, check.found))
        if check.ok is False:
            if check.needed:
                lines.append("{:<4}  {:<18}  needed: {}".format("", "", check.needed))
            if check.hint:
                lines.append("{:<4}  {:<18}  {}".format("", "", check.hint))
    lines.append("\n{}".format("all checks passed: 'plan' shows what stage1 will do"
                               if preflight.passed else
                               "some checks failed: nothing was changed; fix them and run "
                               "check again"))
    return "\n".join(lines)


def check_fields(preflight, code):
    # type: (Any, int) -> dict
    return {"ok": preflight.passed, "exit_code": code, "checks": check_list(preflight.checks),
            "failed": check_list(preflight.failures())}


def plan_refusal_fields(preflight):
    # type: (Any) -> dict
    """plan --json's fields when the checks failed: why there is no plan."""
    return {"ok": False, "exit_code": 10, "failed": check_list(preflight.failures())}


def plan_fields(preflight):
    # type: (Any) -> dict
    """plan --json's fields (docs/json.md)."""
    target = preflight.target
    return {"ok": True, "exit_code": 0, "failed": [], "disk": target.disk,
            "swap": partition_path(target.disk, target.swap.number),
            "partitions": [describe(flash, target.manifest) for flash in target.layout.flash],
            "protected_start": target.layout.protected_start,
            "network": target.network.to_dict() if target.network is not None else None,
            "steps": plan_lines(preflight)}


def plan_lines(preflight):
    # type: (Any) -> list
    """The plan as `plan` prints it: the steps stage1 takes, with devices and sectors."""
    target = preflight.target
    layout = target.layout
    manifest = target.manifest
    disk = target.disk
    swap = partition_path(disk, target.swap.number)
    lines = [
        "1. try the backup script, if given (its DIR/VOLUME/ layout and size checked "
        "against what the Supervisor restores and resin-data holds); place the partitions",
        "2. record the partition table of {} and the swap signature of {} (UUID {}, LABEL "
        "{}) in /var/lib/resin-migrate".format(disk, swap,
                                              target.swap_probe.get("UUID", "-"),
                                              target.swap_probe.get("LABEL", "-")),
        "3. swapoff {}".format(swap),
        "4. comment out the swap line of /etc/fstab ({}); keep a copy".format(
            target.fstab_swap.spec if target.fstab_swap else "no line names it"),
        "5. replace {} (sectors {}-{}) with:".format(swap, target.swap.start,
                                                   target.swap.end - 1),
    ]
    if layout.new_extended is not None:
        lines.append("     {} extended, sectors {}-{}".format(
            partition_path(disk, layout.new_extended.number), layout.new_extended.start,
            layout.new_extended.end - 1))
    for flash in layout.flash:
        stream = describe(flash, manifest)["stream"]
        lines.append("     {} {:<12} {:<5} sectors {}-{} ({} MiB){}".format(
            partition_path(disk, flash.number), flash.label, flash.fs, flash.start,
            flash.end - 1, flash.size * 512 >> 20,
            ", from " + stream if stream else ", formatted empty"))
    lines += [
        "   writing sector 0 and the extended boot records itself, and tell the kernel of "
        "each changed partition (BLKPG; the root partition stays mounted)",
        "6. {} each stream onto its partition, read it back with O_DIRECT, compare "
        "sha256".format("download from {} and write".format(preflight.target.bundle)
                        if getattr(preflight.target.bundle, "remote", False) else "write"),
        "7. mkfs.ext4 flash-data; write manifest.json, stage2.env and the log",
        "8. the backup, taken last: --before-backup, the script, backup.tgz (0600) onto "
        "flash-data, read back, its size and sha256 into stage2.env",
        "9. add /etc/grub.d/42_resin-migrate booting {} from {} with '{}', update-grub, "
        "grub-reboot (one boot only)".format(manifest.boot.kernel, manifest.boot.kernel_label,
                                            manifest.boot.cmdline),
        "then, after the reboot, stage 2 writes resinOS ({} MiB, ending before sector {}; "
        "the {} MiB its filesystems use, the rest is skipped) over the start of {}".format(
            manifest.inner_image.raw_size >> 20, layout.protected_start,
            manifest.inner_image.stream_size >> 20, disk),
    ]
    network = preflight.target.network
    if network is not None:
        at = [index for index, line in enumerate(lines) if line.startswith("7. ")][0] + 1
        lines[at:at] = ["   then the network: " + line.strip() if index == 0 else "   " + line
                        for index, line in enumerate(network.lines())]
    return lines
