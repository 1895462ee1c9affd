"""The customer's backup: a script fills an empty directory, which becomes backup.tgz in
the form the balena Supervisor restores.

The Supervisor (balena-supervisor src/lib/migration.ts, REFERENCE.md section 4) extracts
backup.tgz from the root of resin-data into the volumes of the first app: every top-level
entry must be a directory named after one of that release's volumes, and anything else (a
file, a symlink, another name) makes the restore fail, after which it retries forever and
logs only to its journal. Supervisors 8.7.0 to 10.3.1 run `tar -xzf backup.tgz -C DIR .`,
which extracts only members named `./...` (and, with busybox's tar, only when the archive
has the member `./` itself). So the archive holds `./` and `./VOLUME/...` members, and
everything the script left that the Supervisor would not restore is refused here, with the
name and the rule, before anything on the disk changes.
"""

import errno
import os
import stat
import tarfile

from .errors import MigrateError
from .files import ENCODING, ERRORS
from .run import log, run

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import List, Sequence  # noqa: F401  # novermin

    from .manifest import Manifest  # noqa: F401

BACKUP_NAME = "backup.tgz"
STAGING_NAME = "backup"
# The volume of a single-container app: the one name a plain balena app restores.
DEFAULT_VOLUMES = ("resin-data",)
DEFAULT_TIMEOUT = 3600      # seconds the backup script may run
STAGING_MODE = 0o700        # the staged files are the customer's data
ARCHIVE_MODE = 0o600
# Free space kept in resin-data beyond the backup (directory blocks, journal slack).
ROOM_MARGIN = 4 << 20
# tar's own size beyond the files' bytes: a 512-byte header a member, and its rounding
MEMBER_OVERHEAD = 1024


class BackupError(MigrateError):
    exit_code = 10


def room(manifest):
    # type: (Manifest) -> int
    """The largest backup.tgz stage 2 can put into the image's resin-data."""
    return max(0, manifest.inner_image.data_free - ROOM_MARGIN)


def capture(script, workdir, volumes=DEFAULT_VOLUMES, timeout=DEFAULT_TIMEOUT):
    # type: (str, str, Sequence[str], int) -> str
    """Run `script DIR` on an empty DIR (mode 0700) under workdir, check DIR against the
    Supervisor's rules, pack it into workdir/backup.tgz (mode 0600) and remove DIR."""
    if not (os.path.isfile(script) and os.access(script, os.X_OK)):
        raise BackupError("--backup-script {}: not an executable file".format(script))
    staging = os.path.join(workdir, STAGING_NAME)
    if os.path.lexists(staging):
        _remove_tree(staging)
    os.makedirs(staging)
    os.chmod(staging, STAGING_MODE)     # whatever the umask gave
    try:
        _run_script(script, staging, volumes, timeout)
        problems = check_tree(staging, volumes)
        if problems:
            raise BackupError("the backup script {} left what the balena Supervisor cannot "
                              "restore in {}:\n  {}".format(
                                  script, staging, "\n  ".join(problems)))
        for note in outside_links(staging):
            log.warning("backup: %s", note)
        _check_room(staging, workdir)
        return _pack(staging, workdir)
    finally:
        if os.path.lexists(staging):
            _remove_tree(staging)


def _run_script(script, staging, volumes, timeout):
    # type: (str, str, Sequence[str], int) -> None
    env = {"BACKUP_DIR": staging, "BACKUP_VOLUMES": ",".join(volumes)}
    result = run([script, staging], env=env, check=False, timeout=timeout)
    for stream, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        for line in text.splitlines():
            log.info("backup script %s: %s", stream, line)
    if result.timed_out:
        raise BackupError("the backup script {} did not end within {} s (--backup-timeout); it "
                          "was stopped".format(script, timeout))
    if result.returncode != 0:
        raise BackupError("the backup script {} failed (exit code {}): {}".format(
            script, result.returncode, (result.stderr or result.stdout).strip()[-1000:]))


def check_tree(staging, volumes):
    # type: (str, Sequence[str]) -> List[str]
    """What the Supervisor would refuse at the top of the backup: each entry must be a
    real directory named after one of volumes. Empty means it restores."""
    problems = []
    names = sorted(os.listdir(staging))
    if not names:
        problems.append("nothing: the directory is empty (put the data into {}/)".format(
            "/, ".join(volumes)))
    for name in names:
        path = os.path.join(staging, name)
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            problems.append("{}: a symlink (to {}); each top-level entry must be a directory "
                            "holding the data itself (copy it, e.g. cp -a SOURCE/. "
                            "\"$1/{}/\")".format(name, os.readlink(path), volumes[0]))
        elif not stat.S_ISDIR(mode):
            problems.append("{}: not a directory; every top-level entry must be a directory "
                            "named after a volume ({})".format(name, ", ".join(volumes)))
        elif name not in volumes:
            problems.append("{}: not a volume of the app ({}{}); name the volume with "
                            "--backup-volumes, or move it under one".format(
                                name, ", ".join(volumes),
                                "; a dotfile is never one" if name.startswith(".") else ""))
    return problems


def outside_links(staging):
    # type: (str) -> List[str]
    """Symlinks below the top level are kept as links; those that lead outside the backup
    will dangle in the restored volume, which the user may not expect."""
    notes = []
    top = os.path.realpath(staging)
    for root, dirs, files in os.walk(staging):
        for name in dirs + files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                continue
            target = os.readlink(path)
            resolved = os.path.realpath(os.path.join(root, target))
            if resolved != top and not resolved.startswith(top + os.sep):
                notes.append("{} is a symlink to {}, outside the backup: it is kept as a link, "
                             "which will not lead to that file in resinOS".format(
                                 os.path.relpath(path, staging), target))
    return notes


def _check_room(staging, workdir):
    # type: (str, str) -> None
    """The archive goes beside the staged files: refuse when the filesystem holding them has
    not the room for another copy of their size (gzip may not shrink them)."""
    needed = 0
    for root, dirs, files in os.walk(staging):
        for name in dirs + files:
            needed += MEMBER_OVERHEAD + (os.lstat(os.path.join(root, name)).st_size
                                         if name in files else 0)
    info = os.statvfs(workdir)
    free = info.f_bavail * info.f_frsize
    if needed > free:
        raise BackupError("the backup is {} MiB; the filesystem holding {} has {} MiB free for "
                          "backup.tgz. Free space there, or back up less".format(
                              needed >> 20, workdir, free >> 20))


def _pack(staging, workdir):
    # type: (str, str) -> str
    archive = os.path.join(workdir, BACKUP_NAME)
    if os.path.lexists(archive):
        os.unlink(archive)
    # created 0600: the customer's data is never readable by others, not for a moment
    fd = os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL, ARCHIVE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            # member names in UTF-8 whatever the locale; one that is not keeps its bytes
            # (files.py); ./VOLUME/... for both of the Supervisor's extraction commands
            with tarfile.open(fileobj=handle, mode="w:gz", encoding=ENCODING,
                              errors=ERRORS) as tar:
                # "./" first, as `tar -czf backup.tgz -C DIR .` writes it: busybox's tar
                # finds the member "." the old Supervisors name only when it is there (GNU
                # tar matches ./VOLUME/... by prefix either way)
                tar.add(staging, arcname=".", recursive=False, filter=_as_plain_directory)
                for name in sorted(os.listdir(staging)):
                    tar.add(os.path.join(staging, name), arcname="./" + name)
            handle.flush()
            os.fsync(handle.fileno())
    except EnvironmentError as exc:
        if os.path.lexists(archive):
            os.unlink(archive)
        if exc.errno == errno.ENOSPC:
            raise BackupError("no room left for backup.tgz in {}; free space there, or back "
                              "up less".format(workdir)) from exc
        raise
    return archive


def _as_plain_directory(member):
    # type: (tarfile.TarInfo) -> tarfile.TarInfo
    """The "./" member with a directory's usual mode, not the staging directory's 0700:
    tar gives it to the directory it extracts into."""
    member.mode = 0o755
    return member


def _remove_tree(path):
    # type: (str) -> None
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            os.unlink(os.path.join(root, name))
        for name in dirs:
            full = os.path.join(root, name)
            if os.path.islink(full):
                os.unlink(full)
            else:
                os.rmdir(full)
    os.rmdir(path)
