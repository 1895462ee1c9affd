"""Rollback: undo stage 1 while the old system runs, from what the state file recorded.

Works after a complete stage 1 and after an interrupted one: each undo is done only
for the steps that were started, and each can be repeated.
"""

import os
import shutil

from . import disk as disk_module
from . import grub, log, system
from .errors import MigrateError
from .run import run
from .state import State


class RollbackError(MigrateError):
    exit_code = 12


def rollback(sysroot="/"):
    # type: (str) -> str
    state = State(sysroot)
    if not state.exists:
        raise RollbackError("nothing to roll back: no stage 1 state in {}".format(state.path))
    log.open_file(system.in_root(sysroot, log.LOG_PATH))
    log.log.info("rollback: stage 1 steps started: %s", ", ".join(state.get("started")))
    disk = state.get("disk")
    swap = state.get("swap") or {}
    if state.started("grub"):
        grub.disarm(sysroot)
        log.log.info("rollback: GRUB entry %s and its one-shot boot removed", grub.ENTRY_ID)
    if state.started("partition") or state.started("flash-data"):
        _unmount_partitions_of(disk, [swap.get("number")])
        disk_module.write_script(disk, state.get("original_dump"))
        table = disk_module.read_table(disk)
        disk_module.tell_kernel(disk, table)
        log.log.info("rollback: partition table of %s restored", disk)
    if state.started("partition") or state.started("swapoff"):
        _restore_swap(swap)
    if state.started("fstab"):
        copy = state.get("fstab_copy")
        target = system.in_root(sysroot, "etc/fstab")
        shutil.copyfile(copy, target + ".resin-migrate.tmp")
        shutil.copymode(target, target + ".resin-migrate.tmp")
        os.rename(target + ".resin-migrate.tmp", target)
        log.log.info("rollback: /etc/fstab restored")
    if swap.get("active"):
        active = [system.device_of_path(s.path) for s in system.active_swaps()]
        if not any(dev is not None and dev.path == swap["node"] for dev in active):
            run(["swapon", swap["node"]])
            log.log.info("rollback: swap %s on again", swap["node"])
    kept = state.retire("rolled-back")
    log.log.info("rollback complete; the record of stage 1 is kept in %s", kept)
    return kept


def _restore_swap(swap):
    # type: (dict) -> None
    """mkswap with the original UUID and label, unless the swap signature is intact."""
    node = swap["node"]
    probe = disk_module.probe(node)
    if probe.get("TYPE") == "swap" and probe.get("UUID") == swap.get("uuid"):
        return
    argv = ["mkswap"]
    if swap.get("label"):
        argv += ["-L", swap["label"]]
    if swap.get("uuid"):
        argv += ["-U", swap["uuid"]]
    run(argv + [node])
    log.log.info("rollback: swap signature recreated on %s (UUID %s)", node, swap.get("uuid"))


def _unmount_partitions_of(disk, keep):
    # type: (str, list) -> None
    """Unmount flash partitions a killed stage 1 may have left mounted."""
    for mount in reversed(system.mounts()):
        device = system.device_by_number(mount.major, mount.minor)
        if device is None or not device.is_partition or device.disk.path != disk:
            continue
        if mount.target == "/" or device.number in keep or device.number < 1:
            continue
        if mount.target.startswith(("/tmp/resin-migrate-", "/run/resin-migrate-")):
            run(["umount", mount.target])
