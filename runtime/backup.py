"""The customer's backup: a script fills an empty directory, which becomes backup.tgz.

It runs before anything on the disk changes, so a failing script or a backup too large
for flash-data stops the migration while the device is untouched.
"""

import os
import tarfile

from .errors import MigrateError
from .files import ENCODING, ERRORS
from .run import run

BACKUP_NAME = "backup.tgz"


class BackupError(MigrateError):
    exit_code = 10


def capture(script, workdir):
    # type: (str, str) -> str
    """Run `script DIR` on an empty DIR under workdir; pack DIR into workdir/backup.tgz."""
    if not (os.path.isfile(script) and os.access(script, os.X_OK)):
        raise BackupError("--backup-script {}: not an executable file".format(script))
    output = os.path.join(workdir, "backup")
    if os.path.isdir(output):
        _remove_tree(output)
    os.makedirs(output)
    result = run([script, output], env={"BACKUP_DIR": output}, check=False)
    if result.returncode != 0:
        raise BackupError("the backup script {} failed (exit code {}): {}".format(
            script, result.returncode, (result.stderr or result.stdout).strip()[-1000:]))
    archive = os.path.join(workdir, BACKUP_NAME)
    # member names in UTF-8 whatever the locale; one that is not keeps its bytes (files.py)
    with tarfile.open(archive, "w:gz", encoding=ENCODING, errors=ERRORS) as tar:
        for name in sorted(os.listdir(output)):
            tar.add(os.path.join(output, name), arcname=name)
    _remove_tree(output)
    return archive


def _remove_tree(path):
    # type: (str) -> None
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
