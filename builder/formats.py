"""Input images: detect the format by content (python-magic) and expand it to a raw image.

balena publishes flashers as .zip; people also keep them raw or as .gz, .zst or .xz.
The name of a file says nothing reliable, so only its bytes decide.
"""

from __future__ import annotations

import enum
import gzip
import hashlib
import lzma
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import magic
import zstandard

from runtime.run import run

from .errors import InputFormatError
from .progress import Progress

# Zero runs shorter than a chunk are written out; 1 MiB keeps the copies sparse enough.
CHUNK = 1 << 20
ZEROS = bytes(CHUNK)
MBR_DESCRIPTION = "DOS/MBR boot sector"


class ImageFormat(str, enum.Enum):
    RAW = "raw"
    ZIP = "zip"
    GZIP = "gzip"
    ZSTD = "zstd"
    XZ = "xz"


_BY_MIME = {
    "application/zip": ImageFormat.ZIP,
    "application/gzip": ImageFormat.GZIP,
    "application/x-gzip": ImageFormat.GZIP,
    "application/zstd": ImageFormat.ZSTD,
    "application/x-zstd": ImageFormat.ZSTD,
    "application/x-xz": ImageFormat.XZ,
}

SUPPORTED = ("a raw disk image with an msdos partition table, or one packed as .zip, .gz, "
             ".zst or .xz")


@dataclass(frozen=True)
class RawImage:
    """The flasher as a raw image on disk, and what it was made from."""

    path: Path           # the raw image (the input itself when it was raw)
    source: Path         # the file the user gave
    format: ImageFormat
    source_sha256: str   # of the file the user gave, as it was read


def detect(path: Path) -> ImageFormat:
    """The input's format, from its first bytes; InputFormatError for anything else."""
    if not path.is_file():
        raise InputFormatError(f"{path}: no such file; --image takes a flasher image file")
    if path.stat().st_size == 0:
        raise InputFormatError(f"{path}: the file is empty; expected {SUPPORTED}")
    mime = magic.from_file(str(path), mime=True)
    if mime in _BY_MIME:
        return _BY_MIME[mime]
    description = magic.from_file(str(path))
    if description.startswith(MBR_DESCRIPTION):
        return ImageFormat.RAW
    raise InputFormatError(f"{path}: found {description!r} ({mime}); expected {SUPPORTED}")


class _HashingReader:
    """A read-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, handle: BinaryIO, on_read) -> None:
        self._handle = handle
        self._on_read = on_read
        self.sha256 = hashlib.sha256()
        self._position = 0
        self._hashed_to = 0

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        start = self._position
        self._position += len(data)
        # zipfile seeks back and forth: hash each byte of the file once, in order.
        if start <= self._hashed_to < self._position:
            fresh = data[self._hashed_to - start:]
            self.sha256.update(fresh)
            self._hashed_to = self._position
            self._on_read(len(fresh))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self._position = self._handle.seek(offset, whence)
        return self._position

    def tell(self) -> int:
        return self._position

    def seekable(self) -> bool:
        return True

    def finish(self) -> str:
        """Hash what no decompressor read (a zip's tail, trailing bytes) and return the hex."""
        self._handle.seek(self._hashed_to)
        while True:
            data = self._handle.read(CHUNK)
            if not data:
                break
            self.sha256.update(data)
            self._hashed_to += len(data)
            self._on_read(len(data))
        return self.sha256.hexdigest()


def _zip_member(archive: zipfile.ZipFile, source: Path) -> zipfile.ZipInfo:
    files = [info for info in archive.infolist() if not info.is_dir()]
    images = [info for info in files if info.filename.endswith(".img")] or files
    if len(images) != 1:
        names = ", ".join(info.filename for info in files) or "nothing"
        raise InputFormatError(
            f"{source}: the zip archive holds {names}; expected exactly one disk image "
            "(a .img file), as balena's downloads do")
    return images[0]


def _copy_sparse(reader, dest: BinaryIO) -> int:
    """Copy reader to dest, seeking over all-zero chunks so the copy stays sparse."""
    size = 0
    while True:
        data = reader.read(CHUNK)
        if not data:
            break
        if data == ZEROS[: len(data)]:
            dest.seek(len(data), os.SEEK_CUR)
        else:
            dest.write(data)
        size += len(data)
    dest.truncate(size)
    return size


def expand(source: Path, workdir: Path, progress: Progress) -> RawImage:
    """Detect the input's format and give a raw image of it (a sparse copy in workdir)."""
    fmt = detect(source)
    total = source.stat().st_size
    target = source if fmt is ImageFormat.RAW else workdir / "flasher.img"
    label = "hashing image" if fmt is ImageFormat.RAW else f"expanding {fmt.value} image"
    if fmt is ImageFormat.ZSTD:
        _test_zstd(source)
    with progress.bar(label, total) as bar, source.open("rb") as raw:
        reader = _HashingReader(raw, bar.update)
        try:
            if fmt is not ImageFormat.RAW:
                with target.open("wb") as dest:
                    _expand_into(reader, fmt, source, dest)
            digest = reader.finish()
        except (zipfile.BadZipFile, zlib.error, gzip.BadGzipFile, EOFError, lzma.LZMAError,
                zstandard.ZstdError) as exc:
            raise InputFormatError(
                f"{source}: the {fmt.value} data is corrupt or truncated ({exc}); "
                "download the image again and check its checksum") from exc
    if fmt is not ImageFormat.RAW:
        with target.open("rb") as handle:
            head = handle.read(65536)
        description = magic.from_buffer(head)
        if not description.startswith(MBR_DESCRIPTION):
            raise InputFormatError(
                f"{source}: the {fmt.value} data expands to {description!r}, not a disk "
                "image with an msdos partition table")
    return RawImage(path=target, source=source, format=fmt, source_sha256=digest)


def _test_zstd(source: Path) -> None:
    """zstd -t: python-zstandard's reader ends quietly at a truncated frame; the tool does not."""
    result = run(["zstd", "-t", "-q", source], check=False)
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:]
        raise InputFormatError(
            f"{source}: the zstd data is corrupt or truncated ({' '.join(detail)}); download "
            "the image again and check its checksum")


def _expand_into(reader: _HashingReader, fmt: ImageFormat, source: Path, dest: BinaryIO) -> None:
    if fmt is ImageFormat.ZIP:
        with zipfile.ZipFile(reader) as archive, \
                archive.open(_zip_member(archive, source)) as member:
            _copy_sparse(member, dest)
    elif fmt is ImageFormat.GZIP:
        with gzip.GzipFile(fileobj=reader, mode="rb") as stream:
            _copy_sparse(stream, dest)
    elif fmt is ImageFormat.XZ:
        with lzma.LZMAFile(reader) as stream:  # type: ignore[arg-type]
            _copy_sparse(stream, dest)
    elif fmt is ImageFormat.ZSTD:
        decompressor = zstandard.ZstdDecompressor()
        with decompressor.stream_reader(reader, read_across_frames=True) as stream:  # type: ignore[arg-type]
            _copy_sparse(stream, dest)
    else:  # pragma: no cover - detect() returns only the formats above
        raise AssertionError(fmt)


class _RangeReader:
    """Reads at most `remaining` bytes of a file from its current position."""

    def __init__(self, handle: BinaryIO, length: int, on_read) -> None:
        self._handle = handle
        self._remaining = length
        self._on_read = on_read

    def read(self, size: int) -> bytes:
        data = self._handle.read(min(size, self._remaining))
        self._remaining -= len(data)
        self._on_read(len(data))
        return data


def extract_range(image: Path, offset: int, length: int, dest: Path, progress: Progress,
                  description: str) -> None:
    """Copy image[offset:offset+length] into dest, sparse; refuse a short image."""
    with image.open("rb") as handle, dest.open("wb") as out, \
            progress.bar(description, length) as bar:
        handle.seek(offset)
        copied = _copy_sparse(_RangeReader(handle, length, bar.update), out)
    if copied != length:
        raise InputFormatError(f"{image}: ends {length - copied} bytes before the end of the "
                               f"partition at byte {offset}; the image is truncated")
