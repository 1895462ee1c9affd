"""Independent readers the tests check results with: the tools a user would reach for."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from tests.imaging import SECTOR, Part, base_env


def sh(*argv: object, check: bool = True,
       input: bytes | None = None) -> subprocess.CompletedProcess:
    """argv's result, captured; sbin on PATH (sfdisk, blkid, debugfs live there) for a user
    whose PATH lacks it."""
    return subprocess.run([str(arg) for arg in argv], capture_output=True, check=check,
                          input=input, env={**os.environ, "PATH": base_env()["PATH"]})


def sha256(path: Path) -> str:
    """sha256sum's digest of the file. The holes of a sparse file are hashed as the zeros
    they read as, without reading them: the test flashers are GiBs of mostly holes."""
    digest = hashlib.sha256()
    zeros = memoryview(bytes(1 << 20))
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        position = 0
        while position < size:
            try:
                data_at = os.lseek(handle.fileno(), position, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                data_at = size
            while position < data_at:
                step = min(len(zeros), data_at - position)
                digest.update(zeros[:step])
                position += step
            if position >= size:
                break
            hole_at = os.lseek(handle.fileno(), position, os.SEEK_HOLE)
            handle.seek(position)
            while position < hole_at:
                chunk = handle.read(min(1 << 20, hole_at - position))
                if not chunk:
                    raise OSError(f"{path}: shorter than its size while hashing it")
                digest.update(chunk)
                position += len(chunk)
    return digest.hexdigest()


def blkid(path: Path | str, offset: int | None = None, size: int | None = None) -> dict[str, str]:
    argv: list[object] = ["blkid", "-p", "-o", "export"]
    if offset is not None:
        argv += ["-O", offset]
    if size is not None:
        argv += ["-S", size]
    out = sh(*argv, path, check=False).stdout.decode()
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def sfdisk_json(path: Path | str) -> dict:
    """The partition table as sfdisk --json reads it from a file or a device."""
    return json.loads(sh("sfdisk", "--json", path).stdout)["partitiontable"]


def sfdisk_partitions(path: Path | str) -> dict[int, Part]:
    """Number -> partition of a file's or a device's table (msdos or GPT), read by sfdisk
    --json (which names partition N of X "XN", or "XpN" when X ends in a digit)."""
    table = sfdisk_json(path)
    if int(table.get("sectorsize", SECTOR)) != SECTOR:
        raise ValueError(f"{path}: sectors of {table['sectorsize']} bytes, not {SECTOR}")
    found = {}
    for part in table.get("partitions", []):
        suffix = str(part["node"])[len(str(path)):]
        if not suffix.lstrip("p").isdigit():
            raise ValueError(f"{path}: sfdisk names a partition {part['node']}")
        number = int(suffix.lstrip("p"))
        found[number] = Part(number, int(part["start"]), int(part["size"]),
                             str(part["type"]), bool(part.get("bootable", False)))
    return found


def e2fsck_clean(path: Path) -> subprocess.CompletedProcess:
    return sh("e2fsck", "-fn", path, check=False)


def debugfs_cat(image: Path | str, path: str) -> bytes:
    return sh("debugfs", "-R", f"cat {path}", image).stdout


def debugfs_stat(image: Path, path: str) -> str:
    return sh("debugfs", "-R", f"stat {path}", image).stdout.decode()


def fat_read(image: Path, path: str) -> bytes:
    return sh("mcopy", "-n", "-i", image, f"::{path}", "-").stdout


def fat_files(image: Path) -> list[str]:
    out = sh("mdir", "-i", image, "-/", "-b", "::/").stdout.decode()
    return sorted(line.strip().removeprefix("::") for line in out.splitlines() if line.strip())


def decompress(stream: Path, dest: Path) -> Path:
    tool = {".gz": "gzip", ".zst": "zstd"}[stream.suffix]
    with dest.open("wb") as out:
        subprocess.run([tool, "-dc", str(stream)], stdout=out, check=True)
    return dest


def read_range(image: Path, start: int, size: int) -> bytes:
    with image.open("rb") as handle:
        handle.seek(start)
        return handle.read(size)


def extents_sha256(image: Path, extents: list) -> str:
    """sha256 of image's bytes in the extents ([start, length, sha256]), one after the
    other; each extent's own sha256 is checked on the way."""
    digest = hashlib.sha256()
    with image.open("rb") as handle:
        for start, length, expected in extents:
            handle.seek(start)
            data = handle.read(length)
            assert len(data) == length, f"{image} ends before byte {start + length}"
            assert hashlib.sha256(data).hexdigest() == expected, f"extent at {start}"
            digest.update(data)
    return digest.hexdigest()
