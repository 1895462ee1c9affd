"""Where the migration stands: the state file and the last lines of the log."""

import glob
import os

from . import log, system
from .state import STATE_DIR, STATE_FILE, State


def status(sysroot="/", lines=15):
    # type: (str, int) -> dict
    state = State(sysroot)
    log_path = system.in_root(sysroot, log.LOG_PATH)
    tail = []
    if os.path.exists(log_path):
        with open(log_path) as handle:
            tail = handle.read().splitlines()[-lines:]
    if state.exists:
        done = state.get("done")
        phase = "stage 1 complete: the next boot starts the flasher" if "complete" in done \
            else "stage 1 interrupted after: {} (run stage1 again, or rollback)".format(
                ", ".join(done) or "nothing")
    else:
        kept = sorted(glob.glob(system.in_root(sysroot, os.path.join(
            STATE_DIR, STATE_FILE + ".*"))))
        phase = "no migration under way" + (
            " (last: {})".format(os.path.basename(kept[-1])) if kept else "")
    found = {"phase": phase, "state": state.data if state.exists else None,
             "log": log_path, "log_tail": tail, "stage2_log_tail": [],
             # a stream being written (from --bundle-url: downloaded) right now, or None
             "progress": state.get("progress") if state.exists else None}
    if state.exists and state.done("flash-data"):
        found["stage2_log_tail"] = _stage2_log(state, lines)
    return found


def _stage2_log(state, lines):
    # type: (State, int) -> list
    """The last lines stage 2 wrote on flash-data: after a fallback boot, why it refused."""
    from .errors import MigrateError
    from .stage1 import Mounted
    # the disk holding / now: device names may have moved since stage 1 recorded them
    mount = system.mount_of(state.sysroot)
    holder = system.device_by_number(mount.major, mount.minor)
    disk = holder.disk.path if holder is not None else state.get("disk")
    for entry in state.get("layout") or []:
        if entry["label"] != "flash-data":
            continue
        device = system.partition_path(disk, entry["number"])
        if not os.path.exists(device):
            return []
        try:
            with Mounted(device, "ro") as mountpoint:
                path = os.path.join(mountpoint, "resin-migrate-stage2.log")
                if os.path.exists(path):
                    with open(path) as handle:
                        return handle.read().splitlines()[-lines:]
        except (MigrateError, EnvironmentError):
            return ["(flash-data could not be read)"]
    return []
