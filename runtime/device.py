"""The device between runs of the runtime: whether the disk stage 1 recorded is still the
one holding the root filesystem, and temporary mounts of its partitions. Used by stage 1,
rollback and status."""

import os
import tempfile

from . import disk as disk_module
from . import system
from .errors import MigrateError
from .preflight import RefusedError
from .run import run
from .state import recorded

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from .state import State  # noqa: F401


def same_disk(state, sysroot):
    # type: (State, str) -> str
    """The recorded disk, after proving it is still the disk holding the root filesystem
    (device names can move between boots: a USB stick may now be /dev/sda)."""
    disk = recorded(state.record.disk, "disk")
    mount = system.mount_of(sysroot)
    device = system.device_by_number(mount.major, mount.minor)
    holding = device.disk.path if device is not None else None
    if holding != disk:
        raise RefusedError("stage 1 recorded the disk {}, but the root filesystem is now on "
                           "{}; refusing to touch either".format(disk, holding))
    identity = state.record.identity
    if identity and disk_module.identity(disk) != identity:
        raise RefusedError("{} is not the disk stage 1 recorded (size or disk identifier "
                           "differ: {} now, {} recorded)".format(
                               disk, disk_module.identity(disk), identity))
    return disk


MOUNT_DIR = "/run" if os.path.isdir("/run") else "/tmp"
MOUNT_PREFIX = "resin-migrate-"


def unmount_stale(disk):
    # type: (str) -> None
    """Unmount what a killed stage 1 left mounted from disk in MOUNT_DIR."""
    for mount in reversed(system.mounts()):
        device = system.device_by_number(mount.major, mount.minor)
        if device is None or not device.is_partition or device.disk.path != disk:
            continue
        if os.path.dirname(mount.target) == MOUNT_DIR and \
                os.path.basename(mount.target).startswith(MOUNT_PREFIX):
            run(["umount", mount.target])
            os.rmdir(mount.target)


class Mounted(object):
    """Mount a filesystem on a temporary directory for the duration of a with block."""

    def __init__(self, device, options="rw"):
        # type: (str, str) -> None
        self.device = device
        self.options = options
        self.path = ""

    def __enter__(self):
        self.path = tempfile.mkdtemp(prefix=MOUNT_PREFIX, dir=MOUNT_DIR)
        try:
            run(["mount", "-o", self.options, self.device, self.path])
        except MigrateError:
            os.rmdir(self.path)
            raise
        return self.path

    def __exit__(self, *exc):
        run(["sync"])
        run(["umount", self.path])
        os.rmdir(self.path)
