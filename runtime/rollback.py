"""Rollback: undo stage 1 while the old system runs, from what the state file recorded.

Works after a complete stage 1 and after an interrupted one: each undo is done only
for the steps that were started, and each can be repeated.
"""

import os

from . import blockdev, bootcore, grub, log, system
from . import disk as disk_module
from .backup import BACKUP_NAME
from .device import same_disk, unmount_stale
from .errors import MigrateError
from .files import encode, read_text, write_atomic
from .run import run
from .state import FSTAB_MARK, SECTOR0_COPY, TABLE_COPY, State, recorded

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Optional  # noqa: F401  # novermin

    from .state import SwapRecord  # noqa: F401


class RollbackError(MigrateError):
    exit_code = 12


def rollback(sysroot="/"):
    # type: (str) -> str
    state = State(sysroot)
    if not state.exists:
        raise RollbackError("nothing to roll back: no stage 1 state in {}".format(state.path))
    state.check_version()
    state.lock()
    log.open_file(system.in_root(sysroot, log.LOG_PATH))
    log.log.info("rollback: stage 1 steps started: %s", ", ".join(state.record.started))
    swap = state.record.swap
    disk = same_disk(state, sysroot) if state.record.disk else None
    if state.started("grub"):
        grub.disarm(sysroot)
        log.log.info("rollback: GRUB entry %s and its one-shot boot removed", grub.ENTRY_ID)
    copy = state.file(TABLE_COPY)
    if disk and os.path.exists(copy):
        # written before stage 1 changed the table: its sectors as the disk held them
        unmount_stale(disk)
        disk_module.restore_records(disk, disk_module.load_records(copy))
        disk_module.tell_kernel(disk, disk_module.read_table(disk))
        log.log.info("rollback: partition table of %s restored (sector 0 and every extended "
                     "boot record, byte for byte)", disk)
    if disk and os.path.exists(state.file(SECTOR0_COPY)):
        _restore_boot_code(disk, state.file(SECTOR0_COPY))
    if state.started("partition") or state.started("swapoff"):
        _restore_swap(swap)
    if state.started("fstab"):
        _restore_fstab(system.in_root(sysroot, "etc/fstab"),
                       recorded(state.record.fstab_copy, "copy of /etc/fstab"), swap)
    if swap is not None and swap.active and system.swap_in_use(swap.node) is None:
        run(["swapon", swap.node])
        log.log.info("rollback: swap %s on again", swap.node)
    backup = state.file(BACKUP_NAME)     # left by a backup step that failed
    if os.path.exists(backup):
        os.unlink(backup)
    kept = state.retire("rolled-back")
    log.log.info("rollback complete; the record of stage 1 is kept in %s", kept)
    return kept


def _restore_fstab(target, copy, swap):
    # type: (str, str, Optional[SwapRecord]) -> None
    """/etc/fstab as stage 1 found it: its copy, if the copy holds the swap line stage 1
    commented out; else (a copy that never reached the disk before a power cut) the
    current file with that one line uncommented."""
    with open(copy, "rb") as handle:
        saved = handle.read()
    line = swap.fstab_text if swap is not None else None
    if line and encode(line) not in saved:
        current = read_text(target)
        write_atomic(target, current.replace(FSTAB_MARK + line, line))
        log.log.info("rollback: /etc/fstab: the swap line uncommented (the copy %s is "
                     "incomplete: %d bytes)", copy, len(saved))
        return
    write_atomic(target, saved)
    log.log.info("rollback: /etc/fstab restored")


def _restore_swap(swap):
    # type: (Optional[SwapRecord]) -> None
    """mkswap with the original UUID and label, unless the swap signature is intact."""
    if swap is None:
        return      # stopped before it recorded the swap: nothing of it was changed
    node = swap.node
    probe = disk_module.probe(node)
    if probe.get("TYPE") == "swap" and probe.get("UUID") == swap.uuid:
        return
    argv = ["mkswap"]
    if swap.label:
        argv += ["-L", swap.label]
    if swap.uuid:
        argv += ["-U", swap.uuid]
    run(argv + [node])
    log.log.info("rollback: swap signature recreated on %s (UUID %s)", node, swap.uuid)


def _restore_boot_code(disk, copy):
    # type: (str, str) -> None
    """Sector 0's boot code as stage 1 found it (stage 2 puts it back itself when it gives
    up before writing; this covers a flasher that could not), the table left as restored."""
    with open(copy, "rb") as handle:
        original = handle.read()
    current = blockdev.read_sectors(disk, 0, 1)
    if current[:bootcore.DISK_ID] == original[:bootcore.DISK_ID]:
        return
    blockdev.write_sectors(disk, 0, original[:bootcore.DISK_ID] + current[bootcore.DISK_ID:])
    log.log.info("rollback: the boot code in sector 0 of %s restored", disk)
