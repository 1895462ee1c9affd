"""Input formats are recognised by content and expanded to the exact raw bytes."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import zstandard

from builder.errors import InputFormatError
from builder.formats import ImageFormat, detect, expand
from builder.progress import Progress

QUIET = Progress(quiet=True)


@pytest.fixture(scope="module")
def raw_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24 MiB msdos-partitioned image with some data and a long zero run."""
    path = tmp_path_factory.mktemp("formats") / "disk.img"
    with path.open("wb") as handle:
        handle.truncate(24 << 20)
    subprocess.run(["sfdisk", "-q", str(path)], input=b"label: dos\nstart=2048, type=83\n",
                   check=True)
    with path.open("r+b") as handle:
        handle.seek(12 << 20)
        handle.write(os.urandom(1 << 20))
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pack(raw: Path, fmt: ImageFormat, dest_dir: Path) -> Path:
    data = raw.read_bytes()
    if fmt is ImageFormat.RAW:
        return raw
    dest = dest_dir / f"image.{fmt.value}"
    if fmt is ImageFormat.ZIP:
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("resin-intel-nuc-2.x.img", data)
    elif fmt is ImageFormat.GZIP:
        dest.write_bytes(gzip.compress(data))
    elif fmt is ImageFormat.XZ:
        dest.write_bytes(lzma.compress(data))
    elif fmt is ImageFormat.ZSTD:
        # as the zstd tool writes it: with a checksum
        dest.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(data))
    return dest


@pytest.mark.parametrize("fmt", list(ImageFormat))
def test_each_format_expands_to_the_same_bytes(fmt, raw_image, tmp_path) -> None:
    packed = _pack(raw_image, fmt, tmp_path)
    # the name says nothing: the content decides
    anonymous = tmp_path / "download.bin"
    os.link(packed, anonymous)
    assert detect(anonymous) is fmt
    work = tmp_path / "work"
    work.mkdir()
    result = expand(anonymous, work, QUIET)
    assert result.format is fmt
    assert result.source_sha256 == _sha256(packed)
    assert _sha256(result.path) == _sha256(raw_image)
    if fmt is not ImageFormat.RAW:
        # zero runs become holes: the copy uses far less disk than its size
        assert result.path.stat().st_blocks * 512 <= 2 << 20


@pytest.mark.parametrize("content, found", [
    (b"", "empty"),
    (b'{"deviceType": "intel-nuc"}\n', "JSON"),
    (b"just some text\n" * 10, "text"),
])
def test_unknown_content_is_refused_saying_what_was_found(content, found, tmp_path) -> None:
    path = tmp_path / "flasher.img"
    path.write_bytes(content)
    with pytest.raises(InputFormatError, match=found):
        detect(path)


def _damage(path: Path, at: float) -> None:
    data = bytearray(path.read_bytes())
    position = int(len(data) * at)
    for offset in range(position, position + 64):
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fmt", [ImageFormat.ZIP, ImageFormat.GZIP, ImageFormat.XZ,
                                 ImageFormat.ZSTD])
@pytest.mark.parametrize("harm", ["flipped", "truncated"])
def test_corrupt_or_truncated_archives_are_refused(fmt, harm, raw_image, tmp_path) -> None:
    packed = _pack(raw_image, fmt, tmp_path)
    if harm == "flipped":
        _damage(packed, 0.5)
    else:
        with packed.open("r+b") as handle:
            handle.truncate(packed.stat().st_size * 2 // 3)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(InputFormatError,
                       match=r"corrupt or truncated|not a disk image|holds nothing"):
        expand(packed, work, QUIET)


def test_zip_without_a_single_image_is_refused(raw_image, tmp_path) -> None:
    archive_path = tmp_path / "two.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("a.img", b"x")
        archive.writestr("b.img", b"y")
    with pytest.raises(InputFormatError, match="a.img, b.img; expected exactly one"):
        expand(archive_path, tmp_path, QUIET)


def test_archive_of_something_else_is_refused(tmp_path) -> None:
    packed = tmp_path / "notes.gz"
    packed.write_bytes(gzip.compress(b"release notes\n" * 100))
    with pytest.raises(InputFormatError, match="not a disk image"):
        expand(packed, tmp_path, QUIET)
