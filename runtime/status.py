"""Where the migration stands: the state file and the last lines of the log."""

import fcntl
import glob
import os
import time

from . import log, system
from .stage2names import JOURNAL_NAME, LOG_NAME
from .state import STATE_DIR, STATE_FILE, State

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Optional, Tuple  # noqa: F401  # novermin


# status's "phase" (docs/json.md): a word a fleet tool can branch on; "summary" says it
NO_MIGRATION = "none"
STAGE1_RUNNING = "stage1-running"               # a stage1 (or rollback) holds the lock
STAGE1_INTERRUPTED = "stage1-interrupted"
STAGE1_COMPLETE = "stage1-complete"             # the flasher boots next
FLASHER_NOT_STARTED = "flasher-not-started"     # the one-shot entry was spent, no stage 2
STAGE2_STOPPED = "stage2-stopped"               # it brought this system back, unchanged
STAGE2_WRITING = "stage2-writing"               # past its point of no return
STAGE2_FILES = "stage2-files"                   # no state here; stage 2's files on flash-data


def stage1_record(state):
    # type: (State) -> dict
    """What stage 1 has done on this device, from its state file (read once, by State)."""
    done = list(state.record.done) if state.exists else []
    taken = state.record.backup_taken if state.exists else None
    return {"steps_done": done, "complete": "complete" in done, "backup_taken": taken,
            "running": state.exists and _locked(state),
            "log": system.in_root(state.sysroot, log.LOG_PATH)}


def status(sysroot="/", lines=15):
    # type: (str, int) -> dict
    state = State(sysroot)
    found = stage1_record(state)  # type: dict
    tail = []
    if os.path.exists(found["log"]):
        tail = system.read_text(found["log"], "").splitlines()[-lines:]
    done = found["steps_done"]
    if not state.exists:
        kept = sorted(glob.glob(system.in_root(sysroot, os.path.join(
            STATE_DIR, STATE_FILE + ".*"))))
        phase, summary = NO_MIGRATION, "no migration under way" + (
            " (last: {})".format(os.path.basename(kept[-1])) if kept else "")
    elif found["complete"]:
        phase, summary = STAGE1_COMPLETE, "stage 1 complete: the next boot starts the flasher"
    elif found["running"]:
        phase, summary = STAGE1_RUNNING, "stage 1 (or a rollback) running; done: {}".format(
            ", ".join(done) or "nothing")
    else:
        phase, summary = STAGE1_INTERRUPTED, "stage 1 interrupted after: {} (run stage1 " \
            "again, or rollback)".format(", ".join(done) or "nothing")
    taken = found["backup_taken"]
    age = max(0, int(time.time()) - int(taken)) if taken else None
    if age is not None and found["complete"]:
        summary += "; the backup is {} min old (run stage1 again to take it again)".format(
            age // 60)
    found.update({"state": state.record.to_dict() if state.exists else None,
                  "log_tail": tail, "stage2_log_tail": [], "stage2_journal": [],
                  # a stream being written (from --bundle-url: downloaded) right now, or None
                  "progress": state.record.progress if state.exists else None,
                  # when the backup stage 2 will restore was taken: what changed since is
                  # not in it
                  "backup_age_seconds": age})
    if state.exists and state.done("flash-data"):
        found["stage2_log_tail"], found["stage2_journal"] = _stage2_files(
            _flash_data_device(state), lines)
        stopped = stage2_outcome(list(found["stage2_journal"] or []))
        if stopped:
            phase, summary = stopped
        elif found["complete"] and not _armed(sysroot):
            phase, summary = FLASHER_NOT_STARTED, (
                "stage 1 complete, but GRUB's one-shot entry was spent and stage 2 never "
                "started: the flasher did not boot (power lost, or its kernel failed; a "
                "panic reboots after panic=10). Run 'rollback', then stage1 to try again")
    elif not state.exists:
        # from resinOS or a rescue system: stage 2's files, wherever flash-data is
        from .disk import devices_with_label
        devices = devices_with_label("flash-data")
        if devices:
            found["stage2_log_tail"], found["stage2_journal"] = _stage2_files(
                devices[0], lines)
            if found["stage2_journal"]:
                phase, summary = STAGE2_FILES, "{}; stage 2's files are on {} " \
                    "(flash-data)".format(summary, devices[0])
    found.update(phase=phase, summary=summary)
    return found


def _locked(state):
    # type: (State) -> bool
    """Whether a stage1 or rollback holds the state's lock now (State.lock)."""
    path = state.file("lock")
    if not os.path.exists(path):
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except (IOError, OSError):
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return False


def _armed(sysroot):
    # type: (str) -> bool
    from . import grub
    from .errors import MigrateError
    try:
        with grub.Chroot(sysroot) as chroot:
            return grub.next_entry(chroot) == grub.ENTRY_ID
    except MigrateError:
        return True     # unknown: say nothing more than the state file does


def _flash_data_device(state):
    # type: (State) -> str
    """flash-data's partition on the disk holding / now: device names may have moved since
    stage 1 recorded them."""
    mount = system.mount_of(state.sysroot)
    holder = system.device_by_number(mount.major, mount.minor)
    disk = holder.disk.path if holder is not None else state.record.disk
    if not disk or state.record.placement is None:
        return ""       # stage 1 stopped before it recorded them
    from .plan import Placement, PlanError
    try:
        number = Placement.from_dict(state.record.placement).partition("flash-data").number
    except PlanError:
        return ""       # stage 1 stopped before it placed the partitions
    return system.partition_path(disk, number)


def stage2_outcome(journal):
    # type: (list) -> Optional[Tuple[str, str]]
    """What the journal says of stage 2's boots, seen from the old system, as (phase,
    summary): it ran and brought this system back (the log says why), or None."""
    boots = [line for line in journal if line.startswith("boot ")]
    if not boots:
        return None
    started = [line.split()[1] for line in journal if line.startswith("phase ")
               and line.endswith(" start")]
    # before its first phase, stage 2 reads its inputs: part of its checks
    last = started[-1] if started else "checks"
    if "writing" in journal:
        return STAGE2_WRITING, (
            "stage 2 passed its point of no return ({} boot(s) of the flasher, last in its {} "
            "phase): the disk holds part of resinOS and boots the flasher until it is "
            "complete. Do not roll back; its log below says where it stands".format(
                len(boots), last))
    return STAGE2_STOPPED, (
        "stage 2 ran ({} boot(s) of the flasher) and stopped in its {} phase, before writing "
        "anything of resinOS: this system is as stage 1 left it. Its log below says why; run "
        "'rollback' to get the swap back, or fix the cause and run stage1 and reboot "
        "again".format(len(boots), last))


def _stage2_files(device, lines):
    # type: (str, int) -> tuple
    """The last lines stage 2 wrote on flash-data (device), and its journal: after a
    fallback boot, why it refused; from resinOS or a rescue shell, where it stands."""
    from .device import Mounted
    from .errors import MigrateError
    if not device or not os.path.exists(device):
        return [], []
    try:
        with Mounted(device, "ro") as mountpoint:
            return (_read_lines(os.path.join(mountpoint, LOG_NAME))[-lines:],
                    _read_lines(os.path.join(mountpoint, JOURNAL_NAME)))
    except (MigrateError, EnvironmentError):
        return ["(flash-data could not be read)"], []


def _read_lines(path):
    # type: (str) -> list
    if not os.path.exists(path):
        return []
    return system.read_text(path, "").splitlines()
