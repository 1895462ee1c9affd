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

from tests import imaging, synthetic
from tests.releases import DEFAULT, internal_grub_cfg, os_release

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
    out = imaging.cache_dir().parent / "bench"
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
    for source in (Path(__file__), *synthetic.SOURCES):
        digest.update(source.read_bytes())
    for item in extra:
        digest.update(repr(item).encode())
    return digest.hexdigest()[:16]


def image_key() -> str:
    root, data = _selection()
    listing = [(str(path), path.stat().st_size, int(path.stat().st_mtime))
               for path in root + data]
    return _key(listing)


def _stage(tree: imaging.Tree, files: list[Path], prefix: str) -> None:
    for path in files:
        target = tree.path(f"{prefix}{path}", 0o755 if os.access(path, os.X_OK) else 0o644)
        shutil.copyfile(path, target)


def build_image(path: Path) -> None:
    """Write the resinOS-shaped image (sparse) to path: the layout of an intel-nuc image
    with a full resin-data, GRUB's boot code as the real image has it, the default row's
    /grub/grub.cfg."""
    root_files, data_files = _selection()
    parts = imaging.msdos_layout(
        [(BOOT_SIZE, imaging.TYPE_FAT16_LBA, True), (ROOT_SIZE, imaging.TYPE_LINUX, False),
         (ROOT_SIZE, imaging.TYPE_LINUX, False)], [STATE_SIZE, DATA_SIZE])
    by_number = {part.number: part for part in parts}
    with tempfile.TemporaryDirectory(prefix="bench-image-", dir=bench_dir()) as tmp:
        work = Path(tmp)
        imaging.new_sparse(path, parts[-1].end * imaging.SECTOR)
        imaging.write_table(path, parts, imaging.fixed_u32(SEED, "bench", "id"))
        grub = synthetic.host_grub(work)
        imaging.write_at(path, 0, grub.boot_img[:440])
        imaging.write_at(path, imaging.SECTOR, grub.core_img)
        cfg = internal_grub_cfg(DEFAULT).encode()
        boot = by_number[1]
        imaging.make_fat16(work / "p1", boot.nbytes, "resin-boot", SEED, boot.start, {
            "config.json": b'{"deviceType": "intel-nuc"}\n',
            "grub/grub.cfg": cfg, "EFI/BOOT/grub.cfg": cfg,
            "grub/boot.img": grub.boot_img, "grub/core.img": grub.core_img, **grub.modules,
        }, work)
        imaging.place(work / "p1", path, boot.offset, boot.nbytes)
        root = imaging.Tree(work / "rootA")
        _stage(root, root_files, "")
        root.file("boot/bzImage", imaging.random_bytes(KERNEL_SIZE, SEED, "bzImage"))
        root.file("etc/os-release", os_release(DEFAULT))
        data = imaging.Tree(work / "data")
        _stage(data, data_files, "docker/overlay2/layer")
        for number, label, tree in ((2, "resin-rootA", root), (3, "resin-rootB", None),
                                    (5, "resin-state", None), (6, "resin-data", data)):
            part = by_number[number]
            imaging.make_ext4(work / f"p{number}", part.nbytes, label, SEED, tree, work)
            imaging.place(work / f"p{number}", path, part.offset, part.nbytes)
            (work / f"p{number}").unlink()


def _cached(name: str, make: Callable[[Path], None]) -> Path:
    return imaging.cached(name, make, folder=bench_dir())


def cached_image(key: str) -> Path:
    return _cached(f"resinos-{key}.img", build_image)


def cached_flasher(key: str, image: Path) -> Path:
    """The default row's synthetic flasher around this image, stored raw as in a real one."""
    return _cached(f"flasher-{key}.img", lambda path: synthetic.build_flasher_image(
        path, synthetic.FlasherSpec(), inner=image))


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
