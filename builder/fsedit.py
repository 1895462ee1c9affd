"""Rootless edits inside filesystem images: ext4 through e2fsprogs, FAT through mtools.

Neither tool can be trusted on its exit code alone (debugfs exits 0 when a command
fails), so every edit is checked: debugfs's stderr is read for errors, the
filesystem is checked with e2fsck -fn / fsck.vfat -n, and written files are read
back and hashed. Every call runs with a fixed clock (E2FSPROGS_FAKE_TIME,
SOURCE_DATE_EPOCH) so that the same input gives the same bytes.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runtime.bundle import sha256_file
from runtime.run import run

from .errors import BuilderError, VerifyError

_DEBUGFS_BANNER = re.compile(r"^debugfs \d+\.\d+")


@dataclass(frozen=True)
class Entry:
    """One directory entry as debugfs lists it."""

    name: str
    inode: int
    mode: int
    uid: int
    gid: int
    size: int

    @property
    def is_file(self) -> bool:
        return (self.mode & 0o170000) == 0o100000


def sha256_of(path: Path) -> str:
    return sha256_file(str(path))[1]


class Ext4Image:
    """An ext4 filesystem in a file, edited with debugfs, checked with e2fsck."""

    def __init__(self, path: Path, epoch: int, name: str | None = None) -> None:
        self.path = path
        self.epoch = epoch
        self.name = name or str(path)  # how messages call it (the user's image, partition)

    @property
    def _env(self) -> dict[str, str]:
        return {"E2FSPROGS_FAKE_TIME": str(self.epoch)}

    def debugfs(self, *commands: str, write: bool = False) -> str:
        """Run debugfs commands; raise when debugfs reports an error on any of them."""
        with tempfile.NamedTemporaryFile("w", suffix=".debugfs", delete=False) as script:
            script.write("\n".join(commands) + "\n")
        try:
            result = run(["debugfs", *(["-w"] if write else []), "-f", script.name, self.path],
                         env=self._env)
        finally:
            os.unlink(script.name)
        errors = [line for line in result.stderr.splitlines()
                  if line.strip() and not _DEBUGFS_BANNER.match(line)
                  and not line.startswith("debugfs:  ")]
        if errors:
            raise BuilderError(f"{self.name}: debugfs failed on {'; '.join(commands)}: "
                               f"{'; '.join(errors)}")
        return result.stdout

    def superblock(self) -> dict[str, str]:
        """dumpe2fs -h as a dict ('Block size' -> '4096', ...)."""
        result = run(["dumpe2fs", "-h", self.path], env=self._env)
        fields = {}
        for line in result.stdout.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        return fields

    def list_dir(self, path: str) -> list[Entry]:
        entries = []
        for line in self.debugfs(f"ls -p {path}").splitlines():
            parts = line.strip().split("/")
            # "/inode/mode/uid/gid/name/size/"
            if len(parts) < 7 or parts[5] in (".", ".."):
                continue
            entries.append(Entry(name=parts[5], inode=int(parts[1]), mode=int(parts[2], 8),
                                 uid=int(parts[3]), gid=int(parts[4]),
                                 size=int(parts[6] or 0)))
        return entries

    def entry(self, path: str) -> Entry | None:
        """The entry at path, or None when it does not exist."""
        parent, _, name = path.rstrip("/").rpartition("/")
        try:
            listing = self.list_dir(parent or "/")
        except BuilderError:
            return None
        return next((entry for entry in listing if entry.name == name), None)

    def mtime(self, path: str) -> int:
        out = self.debugfs(f"stat {path}")
        match = re.search(r"^\s*mtime: 0x([0-9a-f]+)", out, re.MULTILINE)
        if not match:
            raise BuilderError(f"{self.name}: no mtime in debugfs stat {path}")
        return int(match.group(1), 16)

    def dump(self, path: str, dest: Path) -> None:
        self.debugfs(f'dump {path} "{dest}"')
        found = self.entry(path)
        if found is None or not dest.is_file() or dest.stat().st_size != found.size:
            raise VerifyError(f"{self.name}: reading {path} out of the filesystem gave "
                              f"{dest.stat().st_size if dest.exists() else 'no'} bytes, "
                              f"expected {found.size if found else 'a file'}")

    def file_sha256(self, path: str, scratch: Path) -> str:
        copy = scratch / "readback"
        try:
            self.dump(path, copy)
            return sha256_of(copy)
        finally:
            copy.unlink(missing_ok=True)

    def put_file(self, source: Path, path: str, mode: int, uid: int, gid: int,
                 mtime: int) -> None:
        """Put source at path (replacing what was there) with the given owner, mode and times."""
        commands = []
        if self.entry(path) is not None:
            commands.append(f"rm {path}")
        commands.append(f'write "{source}" {path}')
        for field, value in (("mode", f"0{0o100000 | mode:o}"), ("uid", uid), ("gid", gid),
                             ("mtime", mtime), ("atime", mtime), ("ctime", mtime),
                             ("crtime", mtime)):
            commands.append(f"set_inode_field {path} {field} {value}")
        self.debugfs(*commands, write=True)

    def remove(self, path: str) -> None:
        self.debugfs(f"rm {path}", write=True)
        if self.entry(path) is not None:
            raise VerifyError(f"{self.name}: {path} is still there after removing it")

    def rdump(self, path: str, dest: Path) -> None:
        """Copy the directory path, recursively, into the host directory dest."""
        self.debugfs(f'rdump {path} "{dest}"')

    def read(self, path: str) -> bytes | None:
        """The bytes of the file at path, or None when there is none."""
        found = self.entry(path)
        if found is None or not found.is_file:
            return None
        with tempfile.TemporaryDirectory() as scratch:
            copy = Path(scratch) / "file"
            self.dump(path, copy)
            return copy.read_bytes()

    def readlink(self, path: str) -> str | None:
        """The target of the symbolic link at path, or None when it is not one."""
        try:
            out = self.debugfs(f"stat {path}")
        except BuilderError:
            return None
        if "Type: symlink" not in out:
            return None
        match = re.search(r'^Fast link dest: "(.*)"$', out, re.MULTILINE)
        if match:
            return match.group(1)
        parent, _, name = path.rstrip("/").rpartition("/")
        with tempfile.TemporaryDirectory() as scratch:  # a slow link: its target is data
            self.rdump(parent, Path(scratch))
            local = Path(scratch) / os.path.basename(parent) / name
            return os.readlink(local) if local.is_symlink() else None

    def symlink(self, path: str, target: str, mtime: int) -> None:
        """A root-owned symbolic link at path (which must not exist) pointing to target."""
        self.debugfs(f"symlink {path} {target}",
                     *(f"set_inode_field {path} {field} {value}" for field, value in
                       (("uid", 0), ("gid", 0), ("mtime", mtime), ("atime", mtime),
                        ("ctime", mtime), ("crtime", mtime))), write=True)
        if self.readlink(path) != target:
            raise VerifyError(f"{self.name}: {path} does not read back as a link to {target}")

    def mkdir(self, path: str, mtime: int) -> None:
        self.debugfs(f"mkdir {path}",
                     *(f"set_inode_field {path} {field} {value}" for field, value in
                       (("uid", 0), ("gid", 0), ("mode", "040755"), ("mtime", mtime),
                        ("atime", mtime), ("ctime", mtime), ("crtime", mtime))), write=True)

    def touch_dir(self, path: str, mtime: int) -> None:
        """Give a directory whose entries changed the fixed build time."""
        self.debugfs(*(f"set_inode_field {path} {field} {mtime}"
                       for field in ("mtime", "ctime", "atime")), write=True)

    def check(self) -> None:
        """e2fsck -fn: raise VerifyError unless the filesystem is clean."""
        result = run(["e2fsck", "-fn", self.path], env=self._env, check=False)
        if result.returncode != 0:
            raise VerifyError(f"{self.name}: e2fsck -fn reports problems (exit code "
                              f"{result.returncode}):\n{result.stdout.strip()[-2000:]}")

    def geometry(self) -> tuple[int, int]:
        """(block size, block count)."""
        fields = self.superblock()
        return int(fields["Block size"]), int(fields["Block count"])

    def shrink(self, headroom_bytes: int, align_bytes: int) -> int:
        """Shrink to the minimum size plus headroom, aligned; truncate the file; return bytes.

        Never grows: a filesystem already smaller than that keeps its size.
        """
        block_size, block_count = self.geometry()
        estimate = run(["resize2fs", "-P", self.path], env=self._env).stdout
        match = re.search(r"minimum size of the filesystem: (\d+)", estimate)
        if not match:
            raise BuilderError(f"{self.name}: resize2fs -P gave no estimate: {estimate!r}")
        wanted = int(match.group(1)) * block_size + headroom_bytes
        wanted = -(-wanted // align_bytes) * align_bytes
        blocks = min(block_count, wanted // block_size)
        if blocks < block_count:
            # -f: the filesystem was just checked with e2fsck -fn, which resize2fs cannot see.
            run(["resize2fs", "-f", self.path, str(blocks)], env=self._env)
        size = blocks * block_size
        os.truncate(self.path, size)
        return size


class FatImage:
    """A FAT filesystem in a file, edited with mtools, checked with fsck.vfat."""

    def __init__(self, path: Path, epoch: int, name: str | None = None) -> None:
        self.path = path
        self.epoch = epoch
        self.name = name or str(path)  # how messages call it (the user's image, partition)

    @property
    def _env(self) -> dict[str, str]:
        return {"SOURCE_DATE_EPOCH": str(self.epoch), "MTOOLS_SKIP_CHECK": "1"}

    def _target(self, path: str) -> str:
        return "::" + path

    def exists(self, path: str) -> bool:
        result = run(["mdir", "-i", self.path, "-b", self._target(path)], env=self._env,
                     check=False)
        return result.returncode == 0

    def read(self, path: str) -> bytes:
        with tempfile.TemporaryDirectory() as scratch:
            copy = Path(scratch) / "file"
            run(["mcopy", "-n", "-i", self.path, self._target(path), copy], env=self._env)
            return copy.read_bytes()

    def read_if(self, path: str) -> bytes | None:
        """The file's bytes, or None when there is no such file."""
        return self.read(path) if self.exists(path) else None

    def listing(self) -> list[str]:
        """Every file and directory, recursively, as absolute paths."""
        out = run(["mdir", "-i", self.path, "-/", "-b", "::/"], env=self._env).stdout
        return sorted(line.strip()[2:] if line.startswith("::") else line.strip()
                      for line in out.splitlines() if line.strip())

    def mkdir(self, path: str) -> None:
        if not self.exists(path):
            run(["mmd", "-i", self.path, self._target(path)], env=self._env)

    def put(self, data: bytes, path: str) -> None:
        """Write data at path, replacing any file there, stamped with the fixed time."""
        with tempfile.TemporaryDirectory() as scratch:
            source = Path(scratch) / "file"
            source.write_bytes(data)
            os.utime(source, (self.epoch, self.epoch))
            run(["mcopy", "-o", "-m", "-i", self.path, source, self._target(path)],
                env=self._env)
        if self.read(path) != data:
            raise VerifyError(f"{self.name}: {path} reads back different from what was written")

    def check(self) -> None:
        result = run(["fsck.vfat", "-n", self.path], check=False)
        if result.returncode != 0:
            raise VerifyError(f"{self.name}: fsck.vfat -n reports problems (exit code "
                              f"{result.returncode}):\n{result.stdout.strip()[-2000:]}")

