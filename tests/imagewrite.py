"""Stage 2's image writer, run on this host's loop devices (tests and `invoke bench`).

Stage 2 itself needs the flasher around it (flash-data, flash-boot's FAT mounted); its
writer does not. Sourced with RESIN_MIGRATE_LIBRARY=1, runtime/resin-migrate-stage2 only
defines its functions, and this harness calls load_extents, write_image, the head write
and verify_image in the order stage 2's main flow does.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from runtime.manifest import InnerImage
from tests.rig.legacy import _detach, _wait_for_nodes
from tests.tools import sh

ROOT = Path(__file__).resolve().parent.parent
STAGE2 = ROOT / "runtime" / "resin-migrate-stage2"

_HARNESS = r"""
set -u -o pipefail
RESIN_MIGRATE_LIBRARY=1 . "$STAGE2"
load_extents
choose_read_flags
choose_hasher
decompress | head -c "$HEAD_BYTES" > "$HEAD"
[ "$(stat -c %s "$HEAD")" = "$HEAD_BYTES" ] || { echo "no head" >&2; exit 3; }
# "write" measures the write alone: no verifiers read back beside it
[ "$MODE" = write ] && READ_FLAGS=
if [ "$MODE" != verify ]; then
    write_image || exit 4
    [ "$MODE" = write ] && exit 0
    dd if="$HEAD" of="$DISK" bs=4M count=1 conv=notrunc,fsync 2>/dev/null || exit 5
fi
verify_image || { cat "$LOG_FILE" >&2; exit 6; }
found=$(extent_sha 0 "$HEAD_BYTES")
[ "$found" = "$HEAD_SHA256" ] || { echo "head read back $found" >&2; exit 7; }
"""


def packed_image(bundle: Path, dest: Path) -> Path:
    """The compressed resinOS image as the builder packed it into the bundle's flash-rootA."""
    from runtime.manifest import load

    inner = load(str(bundle)).inner_image
    root = dest / "flash-rootA.img"
    with root.open("wb") as out:
        subprocess.run(["gzip", "-dc", str(bundle / "flash-rootA.gz")], stdout=out, check=True)
    packed = dest / Path(inner.path).name
    sh("debugfs", "-R", f"dump {inner.path} {packed}", root)
    root.unlink()
    return packed


def stage2_write(disk: str, packed: Path, inner: InnerImage, work: Path,
                 mode: str = "all", wrapper: tuple[str, ...] = (),
                 hasher: str | None = None) -> subprocess.CompletedProcess:
    """Write packed onto disk with stage 2's own functions; exit 0 when read back intact.

    mode: "all" (write, head, read-back), "write" (the extents but the head, no read-back,
    and no verifiers beside the write)
    or "verify" (the read-back of what the disk holds; its log on stderr on a failure).
    hasher "sha256sum" makes stage 2 hash with sha256sum even where openssl is faster.
    """
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ, "STAGE2": str(STAGE2), "RESIN_MIGRATE_DISK": disk,
        "RESIN_MIGRATE_WORK": str(work), "RESIN_MIGRATE_REBOOT": "true",
        "DISK": disk, "IMAGE": str(packed), "HEAD": str(work / "head.img"),
        "RM_IMAGE_COMPRESSION": inner.compression, "RM_IMAGE_RAW_SIZE": str(inner.raw_size),
        "RM_IMAGE_STREAM_SIZE": str(inner.stream_size),
        "RM_IMAGE_EXTENTS": ",".join(":".join(map(str, extent)) for extent in inner.extents),
        "MODE": mode, "RESIN_MIGRATE_HASHER": hasher or "",
    }
    return subprocess.run([*wrapper, "bash", "-c", _HARNESS], env=env, capture_output=True,
                          text=True, timeout=3600)


@contextlib.contextmanager
def loop_device(image: Path, partitions: bool = False,
                read_only: bool = False) -> Iterator[str]:
    """image on a free loop device (its partitions added with partx when asked)."""
    device = sh("losetup", "-f", "--show", *(["-r"] if read_only else []),
                image).stdout.decode().strip()
    try:
        if partitions:
            sh("partx", "-a", device)
            numbers = sh("partx", "-g", "-o", "NR", device).stdout.decode().split()
            _wait_for_nodes([f"{device}p{n}" for n in numbers])
        yield device
    finally:
        _detach(device)
