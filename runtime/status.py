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
    return {"phase": phase, "state": state.data if state.exists else None,
            "log": log_path, "log_tail": tail}
