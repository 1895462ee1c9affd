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

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Any, Dict, List, Optional, TypeVar  # noqa: F401  # novermin

    T = TypeVar("T")

STATE_DIR = "/var/lib/resin-migrate"
STATE_FILE = "state.json"
# 2: the partition tables recorded as runtime/mbr.py's model and the table's sectors saved
# beside it; 1 (before): sfdisk dumps, which this version can neither resume nor undo
STATE_VERSION = 2


# Files in the state directory besides the state file, and the mark of the fstab line
# stage 1 disables: what stage 1 writes and rollback reads back.
FSTAB_MARK = "# disabled by resin-migrate: "
SECTOR0_COPY = "sector0.orig"    # sector 0 before stage 1
# before the new table is written, every sector either table keeps its records in (sector
# 0, the EBRs), as the disk held them; rollback writes them back
TABLE_COPY = "table-sectors.orig.json"
ARMED_MBR_COPY = "sector0.armed"  # the sector 0 stage 2 writes, also on flash-data


class LockedError(MigrateError):
    exit_code = 10


class StateVersionError(MigrateError):
    """The state file was written by another version of resin-migrate."""

    exit_code = 10


def recorded(value, what):
    # type: (Optional[T], str) -> T
    """A fact an earlier step recorded, for a later one: its absence means a state file
    that does not hold what its steps say (edited, or from a bug), never a device's fault."""
    if value is None:
        raise MigrateError("the state file has no {} although the step recording it is done; "
                           "run 'rollback' (it undoes only what the file records)".format(what))
    return value


class SwapRecord(object):
    """The swap partition stage 1 replaced, as rollback makes it again."""

    FIELDS = ("node", "number", "uuid", "label", "active", "fstab_line", "fstab_text")

    def __init__(self, node, number, uuid=None, label=None, active=False, fstab_line=None,
                 fstab_text=None):
        # type: (str, int, Optional[str], Optional[str], bool, Optional[int], Optional[str]) -> None  # noqa: E501
        self.node = node                # its device node when stage 1 ran
        self.number = number
        self.uuid = uuid                # mkswap gives them back
        self.label = label
        self.active = active            # swapon again after the rollback
        self.fstab_line = fstab_line    # the index of the fstab line naming it
        self.fstab_text = fstab_text    # that line, as it was

    def to_dict(self):
        # type: () -> dict
        return dict((name, getattr(self, name)) for name in self.FIELDS)

    @classmethod
    def from_dict(cls, data):
        # type: (Optional[dict]) -> Optional[SwapRecord]
        if not data:
            return None
        return cls(data["node"], data["number"], uuid=data.get("uuid"),
                   label=data.get("label"), active=bool(data.get("active")),
                   fstab_line=data.get("fstab_line"), fstab_text=data.get("fstab_text"))


class Record(object):
    """The state file's content (format STATE_VERSION): the steps started and done, and
    what stage 1 found and replaced. One attribute per key of the file (FIELDS); keys this
    version does not know are kept as they were (extra)."""

    FIELDS = ("version", "started", "done", "updated", "retired", "disk", "disk_sectors",
              "identity", "swap", "fstab_copy", "image_sha256", "bundle", "bundle_url",
              "ca_file", "allow_http", "auth_file", "backup_script", "backup_volumes",
              "backup_timeout", "before_backup", "backup_size", "backup_sha256",
              "backup_taken", "placement", "core_start", "core_sectors", "core_sha256",
              "armed_mbr_sha256", "progress")

    def __init__(self):
        # type: () -> None
        self.version = STATE_VERSION     # type: Any
        self.started = []                # type: List[str]  # step names, in order
        self.done = []                   # type: List[str]
        self.updated = None              # type: Optional[int]  # the last step's end
        self.retired = None              # type: Optional[str]  # why it was moved aside
        # the disk and what it held (step save)
        self.disk = None                 # type: Optional[str]
        self.disk_sectors = None         # type: Optional[int]
        self.identity = None             # type: Optional[Any]  # disk.identity()
        self.swap = None                 # type: Optional[SwapRecord]
        self.fstab_copy = None           # type: Optional[str]  # path of /etc/fstab's copy
        self.image_sha256 = None         # type: Optional[str]  # a resume checks the bundle
        # where the bundle came from (runtime/source.py's to_state)
        self.bundle = None               # type: Optional[str]
        self.bundle_url = None           # type: Optional[str]
        self.ca_file = None              # type: Optional[str]
        self.allow_http = False          # type: bool
        self.auth_file = None            # type: Optional[str]
        # the backup's options (a resumed or repeated stage1 need not give them again) and
        # the archive taken
        self.backup_script = None        # type: Optional[str]
        self.backup_volumes = None       # type: Optional[List[str]]
        self.backup_timeout = None       # type: Optional[int]
        self.before_backup = None        # type: Optional[str]
        self.backup_size = None          # type: Optional[int]
        self.backup_sha256 = None        # type: Optional[str]
        self.backup_taken = None         # type: Optional[int]
        # the flash partitions' placement (plan.Placement.to_dict) and the flasher's boot
        self.placement = None            # type: Optional[dict]
        self.core_start = None           # type: Optional[int]
        self.core_sectors = None         # type: Optional[int]
        self.core_sha256 = None          # type: Optional[str]
        self.armed_mbr_sha256 = None     # type: Optional[str]
        self.progress = None             # type: Optional[dict]  # for status
        self.extra = {}                  # type: Dict[str, Any]

    def update(self, **values):
        # type: (**Any) -> None
        unknown = sorted(set(values) - set(self.FIELDS))
        if unknown:
            raise MigrateError("internal error: no state field {}".format(", ".join(unknown)))
        for name, value in values.items():
            setattr(self, name, value)

    def to_dict(self):
        # type: () -> dict
        found = dict(self.extra)
        for name in self.FIELDS:
            found[name] = getattr(self, name)
        found["swap"] = self.swap.to_dict() if self.swap is not None else None
        return found

    @classmethod
    def from_dict(cls, data):
        # type: (dict) -> Record
        record = cls()
        for name in cls.FIELDS:
            if name in data:
                setattr(record, name, data[name])
        record.started = list(data.get("started") or [])
        record.done = list(data.get("done") or [])
        record.swap = SwapRecord.from_dict(data.get("swap"))
        record.extra = dict((key, value) for key, value in data.items()
                            if key not in cls.FIELDS)
        return record

    def core_facts(self):
        # type: () -> Dict[str, Any]
        """What stage 1 wrote for the flasher's own boot, as stage2_values takes it."""
        return {"core_start": self.core_start, "core_sectors": self.core_sectors,
                "core_sha256": self.core_sha256, "armed_mbr_sha256": self.armed_mbr_sha256}


class State(object):
    """The state file of sysroot and its directory: record is its content, written
    atomically by every change (set, mark_started, mark_done, ...)."""

    def __init__(self, sysroot):
        # type: (str) -> None
        self.sysroot = sysroot
        self.dir = in_root(sysroot, STATE_DIR)
        self.path = os.path.join(self.dir, STATE_FILE)
        self.record = Record()
        if os.path.exists(self.path):
            self.record = Record.from_dict(json.loads(read_text(self.path)))

    @property
    def exists(self):
        # type: () -> bool
        return os.path.exists(self.path)

    def check_version(self):
        # type: () -> None
        """Refuse, changing nothing, a state another version of the format wrote."""
        found = self.record.version
        if found != STATE_VERSION:
            raise StateVersionError(
                "{} has format version {}; this resin-migrate reads version {}. Finish or "
                "roll back with the resin-migrate.pyz that started stage 1 (its bundle), "
                "then use this one".format(self.path, found, STATE_VERSION))

    def file(self, name):
        # type: (str) -> str
        return os.path.join(self.dir, name)

    def set(self, **values):
        # type: (**Any) -> None
        """Change fields of the record (names checked) and save it."""
        self.record.update(**values)
        self.save()

    def started(self, step):
        # type: (str) -> bool
        return step in self.record.started

    def done(self, step):
        # type: (str) -> bool
        return step in self.record.done

    def mark_started(self, step):
        # type: (str) -> None
        if step not in self.record.started:
            self.record.started.append(step)
        self.save()

    def undo(self, steps):
        # type: (tuple) -> None
        """Mark steps as not yet run (stage1 run again after it completed: they repeat)."""
        self.record.started = [step for step in self.record.started if step not in steps]
        self.record.done = [step for step in self.record.done if step not in steps]
        self.save()

    def mark_done(self, step):
        # type: (str) -> None
        if step not in self.record.done:
            self.record.done.append(step)
        self.record.updated = int(time.time())
        self.save()

    def save(self):
        # type: () -> None
        self.make_dir()
        write_atomic(self.path,
                     json.dumps(self.record.to_dict(), indent=2, sort_keys=True) + "\n")

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
        self.record.retired = reason
        self.save()
        kept = self.path + "." + reason + "-" + time.strftime("%Y%m%d%H%M%S")
        os.rename(self.path, kept)
        return kept
