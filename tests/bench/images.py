"""The benchmark's inputs: a resinOS-shaped image as large and as empty as a real one.

A 2.x intel-nuc resinOS image is about 1.8 GB raw: resin-boot (FAT16, 40 MiB, mostly a
compressed kernel), resin-rootA (320 MiB, about 200 MB of binaries and libraries),
resin-rootB (320 MiB, empty), resin-state (20 MiB) and resin-data (the rest, about
850 MB free; the rest holds preloaded container layers). The bench fills rootA and
resin-data with this machine's own /usr files (real binaries, libraries and text,
which compress like a real root filesystem) in a fixed order, and caches the image,
the flasher built around it, and the baselines' sizes, keyed by everything they are
made from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

from tests import synthetic

MiB = 1 << 20
BOOT_SIZE = 40 * MiB
ROOT_SIZE = 320 * MiB
STATE_SIZE = 20 * MiB
DATA_SIZE = 1080 * MiB
ROOT_FILL = 200 * MiB          # bytes of files in resin-rootA
DATA_FILL = 240 * MiB          # bytes of files in resin-data (preloaded layers)
KERNEL_SIZE = 9 * MiB          # a bzImage: compressed already
FILE_LIMIT = 32 * MiB          # no single huge file decides what the image looks like
# Where the files come from, in order; what one source lacks the next one gives.
ROOT_SOURCES = ("/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/sbin", "/usr/lib/python3")
DATA_SOURCES = ("/usr/share", "/usr/lib/gcc", "/usr/libexec", "/usr/lib/python3.11")
SEED = 18


def bench_dir() -> Path:
    out = synthetic.cache_dir().parent / "bench"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _pick(sources: tuple[str, ...], budget: int, skip: set[str]) -> list[Path]:
    """Regular files from sources in sorted walk order until budget bytes."""
    picked, total = [], 0
    for source in sources:
        for directory, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(files):
                path = Path(directory, name)
                if str(path) in skip or path.is_symlink() or not path.is_file():
                    continue
                size = path.stat().st_size
                if size > FILE_LIMIT or not os.access(path, os.R_OK):
                    continue
                picked.append(path)
                total += size
                if total >= budget:
                    return picked
    return picked


def _selection() -> tuple[list[Path], list[Path]]:
    root = _pick(ROOT_SOURCES, ROOT_FILL, set())
    data = _pick(DATA_SOURCES, DATA_FILL, {str(path) for path in root})
    return root, data


def _key(*extra: object) -> str:
    digest = hashlib.sha256()
    for source in (Path(__file__), Path(synthetic.__file__)):
        digest.update(source.read_bytes())
    for item in extra:
        digest.update(repr(item).encode())
    return digest.hexdigest()[:16]


def image_key() -> str:
    root, data = _selection()
    listing = [(str(path), path.stat().st_size, int(path.stat().st_mtime))
               for path in root + data]
    return _key(listing)


def _stage(tree: synthetic._Tree, files: list[Path], prefix: str) -> None:
    for path in files:
        target = tree.path(f"{prefix}{path}", 0o755 if os.access(path, os.X_OK) else 0o644)
        shutil.copyfile(path, target)


def build_image(path: Path) -> None:
    """Write the resinOS-shaped image (sparse) to path."""
    root_files, data_files = _selection()
    parts = synthetic._msdos_layout(
        [(BOOT_SIZE, "e", True), (ROOT_SIZE, "83", False), (ROOT_SIZE, "83", False)],
        [STATE_SIZE, DATA_SIZE])
    by_number = {part.number: part for part in parts}
    with tempfile.TemporaryDirectory(prefix="bench-image-", dir=bench_dir()) as tmp:
        work = Path(tmp)
        synthetic._new_sparse(path, parts[-1].end * synthetic.SECTOR)
        synthetic._write_table(path, parts, synthetic._fixed_u32(SEED, "bench", "id"))
        with path.open("r+b") as handle:     # boot code and a core.img stand-in
            handle.write(synthetic._random_bytes(440, SEED, "boot.img"))
            handle.seek(512)
            handle.write(synthetic._random_bytes(MiB - 512, SEED, "core.img"))
        boot = by_number[1]
        synthetic._make_fat16(work / "p1", boot.nbytes, "resin-boot", SEED, boot.start, {
            "config.json": b'{"deviceType": "intel-nuc"}\n',
            "grub.cfg": synthetic._INNER_GRUB_CFG.encode(),
            "EFI/BOOT/grub.cfg": synthetic._INNER_GRUB_CFG.encode(),
            "bzImage": synthetic._random_bytes(KERNEL_SIZE, SEED, "bzImage"),
        }, work)
        synthetic._place(work / "p1", path, boot.offset, boot.nbytes)
        root = synthetic._Tree(work / "rootA")
        _stage(root, root_files, "")
        root.file("etc/os-release", synthetic._os_release(synthetic.INNER_NAME))
        data = synthetic._Tree(work / "data")
        _stage(data, data_files, "docker/overlay2/layer")
        for number, label, tree in ((2, "resin-rootA", root), (3, "resin-rootB", None),
                                    (5, "resin-state", None), (6, "resin-data", data)):
            part = by_number[number]
            synthetic._make_ext4(work / f"p{number}", part.nbytes, label, SEED, tree, work)
            synthetic._place(work / f"p{number}", path, part.offset, part.nbytes)
            (work / f"p{number}").unlink()


def _cached(name: str, make: Callable[[Path], None]) -> Path:
    final = bench_dir() / name
    if final.exists():
        return final
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        make(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def cached_image(key: str) -> Path:
    return _cached(f"resinos-{key}.img", build_image)


def cached_flasher(key: str, image: Path) -> Path:
    """The synthetic intel-nuc flasher around this image, stored raw as in a real flasher."""
    def make(path: Path) -> None:
        def copy_image(dest: Path, seed: int = 1) -> None:
            subprocess.run(["cp", "--sparse=always", str(image), str(dest)], check=True)

        with mock.patch.object(synthetic, "build_resinos_image", copy_image):
            synthetic.build_flasher_image(path)
    return _cached(f"flasher-{key}.img", make)


def cached_gzip(key: str, source: Path, level: int, name: str) -> Path:
    def make(path: Path) -> None:
        with path.open("wb") as out:
            subprocess.run(["gzip", f"-{level}", "-c", str(source)], stdout=out, check=True)
    return _cached(f"{name}-{key}.gz", make)


def cached_size(key: str, name: str, argv: list[str], source: Path) -> int:
    """The size of `argv < source` (a compressor's output), computed once."""
    sizes = bench_dir() / f"sizes-{key}.json"
    known = json.loads(sizes.read_text()) if sizes.exists() else {}
    if name not in known:
        with source.open("rb") as src:
            proc = subprocess.Popen(argv, stdin=src, stdout=subprocess.PIPE)
            assert proc.stdout is not None
            known[name] = sum(len(chunk) for chunk in _chunks(proc.stdout))
            if proc.wait() != 0:
                raise RuntimeError(f"{' '.join(argv)} failed on {source}")
        sizes.write_text(json.dumps(known, indent=2, sort_keys=True))
    return int(known[name])


def _chunks(stream) -> Iterator[bytes]:
    return iter(lambda: stream.read(4 * MiB), b"")
