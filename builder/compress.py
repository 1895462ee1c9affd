"""Compressed streams, made the same way every time (no timestamps, fixed parameters).

gzip is what every consumer can read (the runtime through zlib, stage 2 through
gzip); zstd is smaller and faster to decompress, but only where a zstd binary exists.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zstandard

from runtime.manifest import Stream

from .progress import Progress

CHUNK = 4 << 20
SUFFIX = {"gzip": ".gz", "zstd": ".zst"}
# zstd's level 19 keeps an 8 MiB window, which any zstd binary decompresses without --long.
ZSTD_LEVEL = 19
GZIP_LEVEL = 9
# Any worker count of one or more gives the same zstd output; zero (single-threaded) differs.
ZSTD_WORKERS = 2


@dataclass(frozen=True)
class Compressed:
    """What compress_file wrote: sizes and hashes of both sides."""

    path: Path
    compression: str
    size: int
    sha256: str
    raw_size: int
    raw_sha256: str

    def stream(self) -> Stream:
        return Stream(file=self.path.name, compression=self.compression, size=self.size,
                      sha256=self.sha256, raw_size=self.raw_size, raw_sha256=self.raw_sha256)


class _HashingWriter:
    def __init__(self, handle) -> None:
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def compress_file(source: Path, dest: Path, compression: str, progress: Progress,
                  description: str | None = None, level: int | None = None) -> Compressed:
    """Compress source into dest, hashing both sides on the way."""
    with source.open("rb") as reader:
        return compress_chunks(iter(lambda: reader.read(CHUNK), b""), source.stat().st_size,
                               dest, compression, progress,
                               description or f"compressing {source.name}", level)


def compress_chunks(chunks: Iterable[bytes], raw_size: int, dest: Path, compression: str,
                    progress: Progress, description: str,
                    level: int | None = None) -> Compressed:
    """Compress raw_size bytes arriving in chunks into dest, hashing both sides."""
    raw_sha = hashlib.sha256()
    seen = 0
    with dest.open("wb") as handle, progress.bar(description, raw_size) as bar:
        out = _HashingWriter(handle)
        if compression == "gzip":
            # wbits 31: a gzip member with mtime 0 and no file name.
            deflater = zlib.compressobj(level or GZIP_LEVEL, zlib.DEFLATED, 31)
            for chunk in chunks:
                raw_sha.update(chunk)
                seen += len(chunk)
                out.write(deflater.compress(chunk))
                bar.update(len(chunk))
            out.write(deflater.flush())
        elif compression == "zstd":
            params = zstandard.ZstdCompressionParameters.from_level(
                level or ZSTD_LEVEL, source_size=raw_size, threads=ZSTD_WORKERS,
                write_checksum=True, write_content_size=True)
            packer = zstandard.ZstdCompressor(compression_params=params)
            with packer.stream_writer(out, size=raw_size,  # type: ignore[arg-type]
                                      closefd=False) as writer:
                for chunk in chunks:
                    raw_sha.update(chunk)
                    seen += len(chunk)
                    writer.write(chunk)
                    bar.update(len(chunk))
        else:
            raise ValueError(f"unknown compression {compression!r}")
    if seen != raw_size:
        raise ValueError(f"{dest}: compressed {seen} bytes, expected {raw_size}")
    return Compressed(path=dest, compression=compression, size=out.size,
                      sha256=out.sha256.hexdigest(), raw_size=raw_size,
                      raw_sha256=raw_sha.hexdigest())
