"""Which bytes of a disk image the final write must put on the disk: its block map.

A filesystem never reads its free blocks, so stage 2 need not write them. The map is
taken from each filesystem's own allocation records (ext4's block bitmaps through
dumpe2fs, the FAT itself), never from scanning for zeros: a block a file owns is
written even when it holds zeros. Everything else (the first 4 MiB with the MBR and
GRUB, boot records of the extended partition, gaps, partitions of another kind) is
written whole.

The extents are then aligned outward to 1 MiB, so that stage 2 writes large aligned
blocks; free runs shorter than MIN_SKIP are written anyway, since one more dd costs
more than the bytes it saves. Finally they are cut into pieces of at most PIECE bytes,
each with its own sha256, so that stage 2 can read them back and hash them on every
core; the first piece is exactly the first 4 MiB, which stage 2 writes last.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime.layout import Layout
from runtime.manifest import EXTENT_ALIGN, HEAD_BYTES
from runtime.run import CommandError, run

from .errors import BuilderError, FlasherLayoutError

MIN_SKIP = 4 * EXTENT_ALIGN
PIECE = 32 * EXTENT_ALIGN
_GROUP_FREE = re.compile(r"^\s+Free blocks: ?(.*)$")
_BLOCK_SIZE = re.compile(r"^Block size:\s+(\d+)$")


@dataclass(frozen=True)
class Extent:
    """A byte range of the image: [start, start + length)."""

    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class BlockMap:
    """The extents stage 2 writes, and how the rest was found to be free."""

    extents: list[Extent]
    image_size: int
    free_by_partition: dict[str, int]   # label (or number) -> bytes its filesystem leaves free

    @property
    def mapped_bytes(self) -> int:
        return sum(extent.length for extent in self.extents)


def ext4_free(image: Path, offset: int, name: str) -> list[Extent]:
    """Free blocks of the ext4 filesystem at byte offset of image, as byte extents in it."""
    try:
        # e2fsprogs opens a filesystem inside a larger file with NAME?offset=BYTES
        out = run(["dumpe2fs", f"{image}?offset={offset}"]).stdout
    except CommandError as exc:
        raise BuilderError(f"{name}: dumpe2fs cannot read the ext4 filesystem at byte "
                           f"{offset}: {exc}") from exc
    block_size = 0
    free = []
    for line in out.splitlines():
        size = _BLOCK_SIZE.match(line)
        if size:
            block_size = int(size.group(1))
            continue
        group = _GROUP_FREE.match(line)
        if not group or not group.group(1).strip():
            continue
        if not block_size:
            raise BuilderError(f"{name}: dumpe2fs listed free blocks before the block size")
        for item in group.group(1).split(","):
            first, _, last = item.strip().partition("-")
            low, high = int(first), int(last or first)
            free.append(Extent(offset + low * block_size, (high - low + 1) * block_size))
    if not block_size:
        raise BuilderError(f"{name}: dumpe2fs printed no block size for the filesystem at "
                           f"byte {offset}")
    return free


def fat_free(image: Path, offset: int, size: int, name: str) -> list[Extent]:
    """Free clusters of the FAT12/16/32 filesystem at byte offset, as byte extents."""
    with image.open("rb") as handle:
        handle.seek(offset)
        boot = handle.read(512)
        if len(boot) < 512 or boot[510:512] != b"\x55\xaa":
            raise FlasherLayoutError(f"{name}: no FAT boot sector at byte {offset}")
        (sector, per_cluster, reserved, fats, root_entries, total16, fat16_size,
         total32, fat32_size) = (
            struct.unpack_from("<H", boot, 11)[0], boot[13], struct.unpack_from("<H", boot, 14)[0],
            boot[16], struct.unpack_from("<H", boot, 17)[0], struct.unpack_from("<H", boot, 19)[0],
            struct.unpack_from("<H", boot, 22)[0], struct.unpack_from("<I", boot, 32)[0],
            struct.unpack_from("<I", boot, 36)[0])
        fat_sectors = fat16_size or fat32_size
        total = total16 or total32
        if (sector not in (512, 1024, 2048, 4096) or per_cluster == 0
                or per_cluster & (per_cluster - 1) or fats == 0 or not fat_sectors
                or total * sector > size):
            raise FlasherLayoutError(f"{name}: the FAT boot sector at byte {offset} is not "
                                     "consistent (sector size, cluster size, FAT size)")
        root_sectors = (root_entries * 32 + sector - 1) // sector
        first_data = reserved + fats * fat_sectors + root_sectors
        clusters = (total - first_data) // per_cluster
        handle.seek(offset + reserved * sector)
        table = handle.read(fat_sectors * sector)
    entries = _fat_entries(table, clusters)
    cluster_bytes = per_cluster * sector
    data_start = offset + first_data * sector
    return [Extent(data_start + (number - 2) * cluster_bytes, cluster_bytes)
            for number, entry in enumerate(entries) if number >= 2 and entry == 0]


def _fat_entries(table: bytes, clusters: int) -> list[int]:
    """The FAT's entries 0 .. clusters + 1 (the type follows from the cluster count)."""
    count = clusters + 2
    if clusters < 4085:       # FAT12: two entries in three bytes
        entries = []
        for number in range(count):
            pair = table[number * 3 // 2: number * 3 // 2 + 2]
            value = int.from_bytes(pair, "little")
            entries.append(value >> 4 if number & 1 else value & 0xFFF)
        return entries
    if clusters < 65525:      # FAT16
        return list(struct.unpack_from(f"<{count}H", table))
    return [value & 0x0FFFFFFF for value in struct.unpack_from(f"<{count}I", table)]


def block_map(image: Path, layout: Layout, name: str) -> BlockMap:
    """The extents of image that stage 2 writes, from its filesystems' free-space maps."""
    size = image.stat().st_size
    sector = layout.sector_size
    free: list[Extent] = []
    free_by_partition = {}
    for part in layout.partitions:
        where = f"{name}: partition {part.number} ({part.label or 'no label'})"
        if part.fs == "ext4":
            found = ext4_free(image, part.start * sector, where)
        elif part.fs == "vfat":
            found = fat_free(image, part.start * sector, part.size * sector, where)
        else:
            continue
        part_end = (part.start + part.size) * sector
        if any(extent.start < part.start * sector or extent.end > part_end for extent in found):
            raise FlasherLayoutError(f"{where}: its filesystem reports free blocks outside the "
                                     "partition; the image is damaged")
        free.extend(found)
        free_by_partition[part.label or str(part.number)] = sum(e.length for e in found)
    return BlockMap(_used_extents(free, size), size, free_by_partition)


def _used_extents(free: list[Extent], size: int) -> list[Extent]:
    """The complement of the free extents, aligned outward; the first 4 MiB always in."""
    skips = []
    for extent in _merge(free):
        low = max(_round_up(extent.start, EXTENT_ALIGN), HEAD_BYTES)
        high = extent.end // EXTENT_ALIGN * EXTENT_ALIGN
        if high - low >= MIN_SKIP:
            skips.append((low, min(high, size)))
    used, position = [], 0
    for low, high in skips:
        if low > position:
            used.append(Extent(position, low - position))
        position = high
    if position < size:
        used.append(Extent(position, size - position))
    # stage 2 writes aligned extents in MiB blocks; an image ending off a MiB boundary
    # gets its tail as an extent of its own
    last = used[-1] if used else None
    if last and last.length % EXTENT_ALIGN and last.length > EXTENT_ALIGN:
        body = last.length // EXTENT_ALIGN * EXTENT_ALIGN
        used[-1:] = [Extent(last.start, body), Extent(last.start + body, last.length - body)]
    return _pieces(used)


def _pieces(extents: list[Extent]) -> list[Extent]:
    """The first 4 MiB on their own, then every extent in pieces of at most PIECE bytes."""
    pieces = []
    for extent in extents:
        start = extent.start
        while start < extent.end:
            limit = HEAD_BYTES if start == 0 else PIECE
            length = min(limit, extent.end - start)
            pieces.append(Extent(start, length))
            start += length
    return pieces


def _merge(extents: list[Extent]) -> list[Extent]:
    merged: list[Extent] = []
    for extent in sorted(extents, key=lambda item: item.start):
        if merged and extent.start <= merged[-1].end:
            top = merged[-1]
            merged[-1] = Extent(top.start, max(top.end, extent.end) - top.start)
        else:
            merged.append(extent)
    return merged


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


class ExtentReader:
    """The image's bytes in the extents, in order, in chunks of at most 4 MiB; once read
    through, sha256s holds each extent's digest."""

    def __init__(self, image: Path, extents: list[Extent]) -> None:
        self.image = image
        self.extents = extents
        self.sha256s: list[str] = []

    def __iter__(self) -> Iterator[bytes]:
        with self.image.open("rb") as handle:
            for extent in self.extents:
                handle.seek(extent.start)
                digest = hashlib.sha256()
                remaining = extent.length
                while remaining:
                    chunk = handle.read(min(remaining, 4 << 20))
                    if not chunk:
                        raise BuilderError(f"{self.image}: ends before byte {extent.end}")
                    remaining -= len(chunk)
                    digest.update(chunk)
                    yield chunk
                self.sha256s.append(digest.hexdigest())
