"""backup.tgz as the balena Supervisor restores it (REFERENCE.md section 4): members
`./VOLUME/...`, every top-level entry a directory named after a volume, extracted with both
of the Supervisor's tar commands; what would not restore refused before anything changes;
the script bounded in time, its output in the log, its data never readable by others."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from runtime import backup

VOLUMES = ("resin-data",)


def _script(tmp_path: Path, body: str) -> str:
    script = tmp_path / "backup.sh"
    script.write_text("#!/bin/sh\nset -e\n" + body)
    script.chmod(0o755)
    return str(script)


def _workdir(tmp_path: Path) -> Path:
    workdir = tmp_path / "state"
    workdir.mkdir()
    return workdir


GOOD = ('mkdir -p "$1/resin-data/config" "$1/resin-data/empty"\n'
        'printf one > "$1/resin-data/config/app.json"\n'
        'printf two > "$1/resin-data/top.txt"\n'
        'ln -s config/app.json "$1/resin-data/current"\n')


def _supervisor_restore(archive: Path, dest: Path, old_form: bool) -> list[str]:
    """GNU tar as supervisors 8.7.0-10.3.1 (`-C DIR .`) and later ones (`-C DIR`) run it;
    the restored tree, each path with its kind."""
    dest.mkdir()
    subprocess.run(["tar", "-xzf", str(archive), "-C", str(dest), *(["."] if old_form else [])],
                   check=True, capture_output=True)
    found = []
    for root, dirs, files in os.walk(dest):
        for name in sorted(dirs + files):
            path = Path(root) / name
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            found.append(f"{path.relative_to(dest)} {kind}")
    return sorted(found)


def test_the_archive_restores_with_both_supervisor_commands(tmp_path: Path) -> None:
    archive = Path(backup.capture(_script(tmp_path, GOOD), str(_workdir(tmp_path)), VOLUMES))
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        top_mode = tar.getmember(".").mode
    # "./" first, then ./VOLUME/...: what `tar -czf backup.tgz -C DIR .` writes
    assert names[0] == "." and all(name.startswith("./resin-data") for name in names[1:]), names
    assert top_mode == 0o755     # tar gives it to the directory it extracts into
    old = _supervisor_restore(archive, tmp_path / "old", old_form=True)
    new = _supervisor_restore(archive, tmp_path / "new", old_form=False)
    assert old == new == sorted([
        "resin-data dir", "resin-data/config dir", "resin-data/config/app.json file",
        "resin-data/empty dir", "resin-data/top.txt file", "resin-data/current link"])
    # the Supervisor's rules: each top-level entry a real directory named after a volume
    for entry in (tmp_path / "old").iterdir():
        assert entry.is_dir() and not entry.is_symlink() and entry.name in VOLUMES
    assert os.readlink(tmp_path / "old/resin-data/current") == "config/app.json"
    assert (tmp_path / "old/resin-data/config/app.json").read_text() == "one"


def test_the_archive_and_the_staging_directory_are_private(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    caplog.set_level(logging.INFO, logger="resin-migrate")
    workdir = _workdir(tmp_path)
    umask = os.umask(0o022)     # the common default: files 0644 unless made otherwise
    try:
        archive = backup.capture(_script(tmp_path, GOOD + 'stat -c "staging mode %a" "$1"\n'
                                         'echo "to stderr" >&2\n'), str(workdir), VOLUMES)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(archive).st_mode) == 0o600
    # the script's output is in the log, the staging directory was 0700 and is gone
    assert "backup script stdout: staging mode 700" in caplog.text
    assert "backup script stderr: to stderr" in caplog.text
    assert sorted(os.listdir(workdir)) == ["backup.tgz"]


@pytest.mark.parametrize("body,named", [
    ('printf x > "$1/notes.txt"\n', "notes.txt: not a directory"),
    ('mkdir "$1/data"; ln -s data "$1/resin-data"\n', "resin-data: a symlink"),
    ('mkdir "$1/resin-data" "$1/.cache"\n', ".cache: not a volume of the app"),
    ('mkdir "$1/resin-data" "$1/other"\n', "other: not a volume of the app"),
    ('true\n', "the directory is empty"),
])
def test_what_would_not_restore_is_refused_and_nothing_is_left(tmp_path: Path, body: str,
                                                               named: str) -> None:
    workdir = _workdir(tmp_path)
    with pytest.raises(backup.BackupError, match="Supervisor cannot restore") as refused:
        backup.capture(_script(tmp_path, body), str(workdir), VOLUMES)
    assert named in str(refused.value)
    assert os.listdir(workdir) == []


def test_more_volumes_are_accepted_when_named(tmp_path: Path) -> None:
    body = 'mkdir -p "$1/resin-data" "$1/uploads"; printf x > "$1/uploads/a"\n'
    archive = backup.capture(_script(tmp_path, body), str(_workdir(tmp_path)),
                             ("resin-data", "uploads"))
    assert "uploads/a file" in _supervisor_restore(Path(archive), tmp_path / "old", True)


def test_a_link_out_of_the_backup_is_kept_and_reported(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="resin-migrate")
    body = 'mkdir "$1/resin-data"; ln -s /etc/hostname "$1/resin-data/host"\n'
    archive = backup.capture(_script(tmp_path, body), str(_workdir(tmp_path)), VOLUMES)
    with tarfile.open(archive) as tar:
        member = tar.getmember("./resin-data/host")
    assert member.issym() and member.linkname == "/etc/hostname"
    assert "resin-data/host is a symlink to /etc/hostname, outside the backup" in caplog.text


def test_a_script_that_hangs_is_stopped_with_what_it_started(tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    body = f'mkdir "$1/resin-data"\nsleep 300 &\necho $! > {marker}\nwait\n'
    with pytest.raises(backup.BackupError, match="did not end within 2 s"):
        backup.capture(_script(tmp_path, body), str(_workdir(tmp_path)), VOLUMES, timeout=2)
    child = int(marker.read_text())
    state = Path(f"/proc/{child}/stat")
    assert not state.exists() or state.read_text().split()[2] == "Z"


@pytest.mark.loop
def test_no_room_for_the_archive_is_refused(tmp_path: Path) -> None:
    """The staging directory's filesystem (a 4 MiB tmpfs) cannot hold the archive too."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        body = 'mkdir "$1/resin-data"; head -c 3000000 /dev/urandom > "$1/resin-data/blob"\n'
        with pytest.raises(backup.BackupError, match="MiB free for backup.tgz"):
            backup.capture(_script(tmp_path, body), str(small), VOLUMES)
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
