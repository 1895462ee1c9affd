"""The block map: stage 2 writes only what the image's filesystems use, and that is enough.

The map is checked against the filesystems' own tools (dumpe2fs, fsck.fat, debugfs,
mshowfat); the write that follows it is checked the way a user would: stage 2's writer
puts the image onto a loop device full of old data, and the filesystems on it pass fsck
and hold every file of the image, byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import stat
from pathlib import Path

import pytest

from builder.blockmap import PIECE, block_map, ext4_free, fat_free
from builder.layout import read_layout
from runtime.errors import ManifestError
from runtime.manifest import EXTENT_ALIGN, HEAD_BYTES, InnerImage, load
from tests.imagewrite import loop_device, packed_image, stage2_write
from tests.synthetic import build_resinos_image
from tests.tools import read_range, sfdisk_json, sh

MiB = 1 << 20
FSCK = {"ext4": ("e2fsck", "-fn"), "vfat": ("fsck.vfat", "-n")}


@pytest.fixture(scope="module")
def resinos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resinos") / "resinos.img"
    build_resinos_image(path)
    return path


def _superblock(image: Path, offset: int) -> dict[str, str]:
    out = sh("dumpe2fs", "-h", f"{image}?offset={offset}").stdout.decode()
    return {key.strip(): value.strip() for key, _, value in
            (line.partition(":") for line in out.splitlines()) if value}


def _extract(image: Path, offset: int, size: int, dest: Path) -> Path:
    dest.write_bytes(read_range(image, offset, size))
    return dest


def test_free_space_agrees_with_the_filesystems_own_counts(resinos: Path, tmp_path: Path) -> None:
    layout = read_layout(resinos)
    for part in layout.partitions:
        offset, size = part.start * 512, part.size * 512
        if part.fs == "ext4":
            fields = _superblock(resinos, offset)
            free = sum(e.length for e in ext4_free(resinos, offset, part.label or ""))
            assert free == int(fields["Free blocks"]) * int(fields["Block size"]), part.label
        elif part.fs == "vfat":
            copy = _extract(resinos, offset, size, tmp_path / "boot.img")
            summary = sh("fsck.fat", "-n", "-v", copy).stdout.decode()
            used, total = map(int, re.search(r"(\d+)/(\d+) clusters", summary).groups())
            cluster = int(re.search(r"(\d+) bytes per cluster", summary).group(1))
            free = sum(e.length for e in fat_free(resinos, offset, size, "resin-boot"))
            assert free == (total - used) * cluster


def _mixed_disk(tmp: Path) -> Path:
    """A 96 MiB msdos disk: a FAT16 and an ext4 partition, each with a file of zeros."""
    disk = tmp / "disk.img"
    with disk.open("wb") as handle:
        handle.truncate(96 * MiB)
    sh("sfdisk", "-q", disk, input=b"label: dos\nstart=8192, size=81920, type=e\n"
                                   b"start=90112, size=98304, type=83\n")
    zeros = tmp / "zeros"
    zeros.write_bytes(bytes(3 * MiB))
    tree = tmp / "tree"
    tree.mkdir()
    # mke2fs -d leaves holes for zero blocks: the file gets 0xff, its blocks zeros after
    (tree / "zeros").write_bytes(b"\xff" * (3 * MiB))
    (tree / "noise").write_bytes(random.Random(1).randbytes(2 * MiB))
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", tree, "-E", f"offset={90112 * 512}",
       disk, "48M")
    with disk.open("r+b") as handle:
        for block in _blocks(disk, 90112 * 512, "/zeros"):
            handle.seek(90112 * 512 + block * 4096)
            handle.write(bytes(4096))
    boot = tmp / "boot.img"
    with boot.open("wb") as handle:
        handle.truncate(40 * MiB)
    sh("mkfs.vfat", "-F", "16", "-n", "BOOT", boot)
    sh("mcopy", "-i", boot, zeros, "::/zeros")
    with disk.open("r+b") as handle:
        handle.seek(8192 * 512)
        handle.write(boot.read_bytes())
    return disk


def _blocks(image: Path, offset: int, path: str) -> list[int]:
    return [int(block) for block in
            sh("debugfs", "-R", f"blocks {path}", f"{image}?offset={offset}").stdout.split()]


def _covered(extents, start: int, length: int) -> bool:
    return any(e.start <= start and start + length <= e.end for e in extents)


def test_blocks_a_file_owns_are_mapped_even_when_they_hold_zeros(tmp_path: Path) -> None:
    disk = _mixed_disk(tmp_path)
    mapped = block_map(disk, read_layout(disk), "disk")
    assert mapped.mapped_bytes < disk.stat().st_size - 32 * MiB  # free space was skipped
    assert mapped.extents[0].start == 0 and mapped.extents[0].length >= HEAD_BYTES
    # ext4: the blocks debugfs says the zero-filled file owns
    ext4_offset = 90112 * 512
    blocks = _blocks(disk, ext4_offset, "/zeros")
    assert len(blocks) == 768
    assert sh("debugfs", "-R", "cat /zeros", f"{disk}?offset={ext4_offset}").stdout == bytes(
        3 * MiB)
    for block in blocks:
        assert _covered(mapped.extents, ext4_offset + block * 4096, 4096), block
    # FAT: the clusters mshowfat lists for the zero-filled file
    boot = _extract(disk, 8192 * 512, 40 * MiB, tmp_path / "boot-copy.img")
    chain = sh("mshowfat", "-i", boot, "::/zeros").stdout.decode()
    first, last = map(int, re.search(r"<(\d+)-(\d+)>", chain).groups())
    summary = sh("fsck.fat", "-n", "-v", boot).stdout.decode()
    cluster = int(re.search(r"(\d+) bytes per cluster", summary).group(1))
    data_start = int(re.search(r"Data area starts at byte (\d+)", summary).group(1))
    start = 8192 * 512 + data_start + (first - 2) * cluster
    assert _covered(mapped.extents, start, (last - first + 1) * cluster)
    # every extent but an image's tail is MiB-aligned
    for extent in mapped.extents:
        assert extent.start % EXTENT_ALIGN == 0 and extent.length % EXTENT_ALIGN == 0


H = "0" * 64


def _inner(**changes) -> InnerImage:
    values = dict(path="/opt/x.zst", original_path="/opt/x", compression="zstd", size=1,
                  sha256=H, raw_size=64 * MiB, raw_sha256=H, stream_size=12 * MiB,
                  stream_sha256=H, extents=[[0, 4 * MiB, H], [4 * MiB, 4 * MiB, H],
                                            [16 * MiB, 4 * MiB, H]],
                  layout=None, data_free=0)
    values.update(changes)
    return InnerImage(**values)


@pytest.mark.parametrize(("extents", "stream", "message"), [
    ([[1 * MiB, 4 * MiB, H], [8 * MiB, 4 * MiB, H]], 8 * MiB, "must be the first"),
    ([[0, 8 * MiB, H]], 8 * MiB, "must be the first"),
    ([[0, 4 * MiB, H], [2 * MiB, 4 * MiB, H]], 8 * MiB, "overlaps"),
    ([[0, 4 * MiB, H], [16 * MiB + 512, 4 * MiB, H]], 8 * MiB, "not aligned"),
    ([[0, 4 * MiB, H], [60 * MiB, 8 * MiB, H]], 12 * MiB, "beyond the image"),
    ([[0, 4 * MiB, H], [16 * MiB, 4 * MiB, H]], 9 * MiB, "add up to"),
])
def test_manifest_refuses_extents_stage_2_could_not_follow(extents, stream, message) -> None:
    _inner().check_extents("inner")
    with pytest.raises(ManifestError, match=message):
        _inner(extents=extents, stream_size=stream).check_extents("inner")


def test_the_map_puts_the_first_4_mib_alone_and_cuts_pieces(resinos: Path) -> None:
    mapped = block_map(resinos, read_layout(resinos), "resinos")
    assert (mapped.extents[0].start, mapped.extents[0].length) == (0, HEAD_BYTES)
    assert all(e.length <= PIECE for e in mapped.extents)
    assert all(a.end <= b.start for a, b in zip(mapped.extents, mapped.extents[1:]))


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under root: type, mode, and content or link target."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            info = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                found[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                found[rel] = ("file", stat.S_IMODE(info.st_mode), info.st_uid, path.read_bytes())
            else:
                found[rel] = ("other", info.st_mode)
    return found


def _files_of(device: str, fs: str, dest: Path) -> dict[str, tuple]:
    """Every file of the filesystem on device (ext4 mounted read-only; FAT copied out with
    mtools, since this host cannot mount vfat)."""
    dest.mkdir()
    if fs != "ext4":
        sh("mcopy", "-s", "-n", "-i", device, "::/", dest)
        return _tree(dest)
    sh("mount", "-o", "ro,noload", device, dest)
    try:
        return _tree(dest)
    finally:
        sh("umount", dest)


@pytest.mark.loop
def test_the_sparse_write_over_old_data_gives_the_image_s_filesystems(
        tmp_path: Path, synthetic_bundle: Path) -> None:
    inner = load(str(synthetic_bundle)).inner_image
    packed = packed_image(synthetic_bundle, tmp_path)
    original = tmp_path / "original.img"
    build_resinos_image(original)
    # the disk holds old data everywhere: nothing can pass for a fresh filesystem's zeros
    disk = tmp_path / "disk.img"
    noise = random.Random(6)
    with disk.open("wb") as handle:
        for _ in range(inner.raw_size // (4 * MiB)):
            handle.write(noise.randbytes(4 * MiB))
    with loop_device(disk) as device:
        result = stage2_write(device, packed, inner, tmp_path / "work")
    assert result.returncode == 0, result.stderr
    assert inner.stream_size < inner.raw_size // 2       # most of the image was skipped

    assert sfdisk_json(disk)["partitions"] == [
        {**part, "node": part["node"].replace(str(original), str(disk))}
        for part in sfdisk_json(original)["partitions"]]
    with loop_device(disk, partitions=True) as written, \
            loop_device(original, partitions=True, read_only=True) as reference:
        for part in inner.layout.partitions:
            if part.fs is None:
                continue
            ours, theirs = f"{written}p{part.number}", f"{reference}p{part.number}"
            check = sh(*FSCK[part.fs], ours, check=False)
            assert check.returncode == 0, check.stdout.decode()
            trees = [_files_of(device, part.fs, tmp_path / f"{name}-{part.number}")
                     for device, name in ((ours, "written"), (theirs, "reference"))]
            assert trees[0] == trees[1], part.label
            assert len(trees[0]) > 0, part.label


@pytest.mark.loop
def test_an_extent_that_reads_back_different_is_named_and_written_again(
        tmp_path: Path, synthetic_bundle: Path) -> None:
    inner = load(str(synthetic_bundle)).inner_image
    packed = packed_image(synthetic_bundle, tmp_path)
    disk = tmp_path / "disk.img"
    with disk.open("wb") as handle:
        handle.truncate(inner.raw_size)
    start, length, _ = inner.extents[2]
    with loop_device(disk) as device:
        written = stage2_write(device, packed, inner, tmp_path / "work")
        assert written.returncode == 0, written.stderr
        intact = _sha256_range(device, start, length)
        with open(device, "r+b") as handle:      # one byte changes on the disk
            handle.seek(start + length // 2)
            byte = handle.read(1)
            handle.seek(start + length // 2)
            handle.write(bytes([byte[0] ^ 0xFF]))
            os.fsync(handle.fileno())
        assert _sha256_range(device, start, length) != intact
        checked = stage2_write(device, packed, inner, tmp_path / "work", mode="verify")
        assert checked.returncode == 0, checked.stderr
        assert _sha256_range(device, start, length) == intact, checked.stderr
    assert f"read back different: extent 2 (bytes from {start})" in checked.stderr
    assert "writing again the extents that read back different: 2 (try 1 of 3)" in checked.stderr


@pytest.mark.loop
@pytest.mark.parametrize(("faults", "ends"), [
    # a disk that returns other bytes twice: the third write holds
    ("write-extent corrupt 2", 0),
    # one that always does: stage 2 reports it after its tries (exit 6: the verify phase)
    ("write-extent corrupt 1000", 6),
])
def test_writes_that_read_back_different_are_retried_a_bounded_number_of_times(
        tmp_path: Path, synthetic_bundle: Path, faults: str, ends: int) -> None:
    inner = load(str(synthetic_bundle)).inner_image
    packed = packed_image(synthetic_bundle, tmp_path)
    disk = tmp_path / "disk.img"
    with disk.open("wb") as handle:
        handle.truncate(inner.raw_size)
    with loop_device(disk) as device:
        result = stage2_write(device, packed, inner, tmp_path / "work", faults=faults)
    assert result.returncode == ends, result.stderr
    retries = result.stderr.count("writing again the extents that read back different")
    if ends == 0:
        assert retries >= 1 and result.stderr.count("fault point write-extent") == 2, result.stderr
    else:
        assert retries == 3 and "extents still differ after 3 tries" in result.stderr


def _sha256_range(device: str, start: int, length: int) -> str:
    return hashlib.sha256(read_range(Path(device), start, length)).hexdigest()
