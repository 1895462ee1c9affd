"""The state file: which steps of stage 1 started and finished, and what they replaced.

It lets `stage1` resume after an interruption, and `rollback` undo exactly what was
done. Written atomically (temporary file, fsync, rename) after every change.
"""

import fcntl
import json
import os
import time

from .errors import MigrateError
from .files import read_text, write_atomic
from .system import in_root

STATE_DIR = "/var/lib/resin-migrate"
STATE_FILE = "state.json"
# 2: the partition tables recorded as runtime/mbr.py's model and the table's sectors saved
# beside it; 1 (before): sfdisk dumps, which this version can neither resume nor undo
STATE_VERSION = 2


class LockedError(MigrateError):
    exit_code = 10


class StateVersionError(MigrateError):
    """The state file was written by another version of resin-migrate."""

    exit_code = 10


class State(object):
    def __init__(self, sysroot):
        # type: (str) -> None
        self.sysroot = sysroot
        self.dir = in_root(sysroot, STATE_DIR)
        self.path = os.path.join(self.dir, STATE_FILE)
        self.data = {"version": STATE_VERSION, "started": [], "done": []}  # type: dict
        if os.path.exists(self.path):
            self.data = json.loads(read_text(self.path))

    @property
    def exists(self):
        # type: () -> bool
        return os.path.exists(self.path)

    def check_version(self):
        # type: () -> None
        """Refuse, changing nothing, a state another version of the format wrote."""
        found = self.data.get("version")
        if found != STATE_VERSION:
            raise StateVersionError(
                "{} has format version {}; this resin-migrate reads version {}. Finish or "
                "roll back with the resin-migrate.pyz that started stage 1 (its bundle), "
                "then use this one".format(self.path, found, STATE_VERSION))

    def file(self, name):
        # type: (str) -> str
        return os.path.join(self.dir, name)

    def get(self, key, default=None):
        return self.data.get(key, default)

    def set(self, **values):
        self.data.update(values)
        self.save()

    def started(self, step):
        # type: (str) -> bool
        return step in self.data["started"]

    def done(self, step):
        # type: (str) -> bool
        return step in self.data["done"]

    def mark_started(self, step):
        # type: (str) -> None
        if step not in self.data["started"]:
            self.data["started"].append(step)
        self.save()

    def undo(self, steps):
        # type: (tuple) -> None
        """Mark steps as not yet run (stage1 run again after it completed: they repeat)."""
        self.data["started"] = [step for step in self.data["started"] if step not in steps]
        self.data["done"] = [step for step in self.data["done"] if step not in steps]
        self.save()

    def mark_done(self, step):
        # type: (str) -> None
        if step not in self.data["done"]:
            self.data["done"].append(step)
        self.data["updated"] = int(time.time())
        self.save()

    def save(self):
        # type: () -> None
        self.make_dir()
        write_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")

    def make_dir(self):
        # type: () -> None
        """The state directory, 0700: it stages the backup and keeps copies of the disk's
        first sectors and /etc/fstab, none of them for other users."""
        if not os.path.isdir(self.dir):
            os.makedirs(self.dir, 0o700)
        os.chmod(self.dir, 0o700)

    def lock(self):
        # type: () -> None
        """Hold an exclusive lock for this process's life: one stage1 or rollback at a time."""
        self.make_dir()
        # kept open (and locked) until the process ends
        self._lock = open(os.path.join(self.dir, "lock"), "w")  # noqa: SIM115
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (IOError, OSError):
            raise LockedError(
                "another resin-migrate stage1 or rollback is running on this device (lock "
                "{}); wait for it to end".format(self._lock.name)) from None

    def retire(self, reason):
        # type: (str) -> str
        """Move the state aside (after a rollback), keeping it for the record."""
        self.data["retired"] = reason
        self.save()
        kept = self.path + "." + reason + "-" + time.strftime("%Y%m%d%H%M%S")
        os.rename(self.path, kept)
        return kept
