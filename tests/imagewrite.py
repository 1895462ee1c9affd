"""Stage 2's image writer, run on this host's loop devices (tests and `invoke bench`).

Stage 2 itself needs the flasher around it (flash-data, flash-boot's FAT mounted); its
writing phases do not. Sourced with RESIN_MIGRATE_LIBRARY=1, runtime/resin-migrate-stage2
only defines its functions, and this harness runs its phases write-body, verify and
write-head as stage 2's main flow does, with a journal of its own in the work directory
(each call starts a fresh one: a first boot of stage 2), and the fault points of a faults
file when one is given.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from runtime.manifest import InnerImage
from runtime.stage2names import FAULTS_NAME
from tests.rig.legacy import _detach, _wait_for_nodes
from tests.tools import sh

ROOT = Path(__file__).resolve().parent.parent
STAGE2 = ROOT / "runtime" / "resin-migrate-stage2"

_HARNESS = r"""
set -u -o pipefail
RESIN_MIGRATE_LIBRARY=1 . "$STAGE2"
: > "$LOG_FILE"
JOURNAL=$WORK/$JOURNAL_NAME
rm -f "$JOURNAL" "$WORK"/verify.*
load_extents
choose_read_flags
choose_hasher
extract_head || { echo "the head does not extract" >&2; exit 3; }
# "write" measures the write alone: no verifiers read back beside it
[ "$MODE" = write ] && READ_FLAGS=
if [ "$MODE" != verify ]; then
    phase_write_body || exit 4
    [ "$MODE" = write ] && exit 0
fi
phase_verify || exit 6
if [ "$MODE" != verify ]; then
    phase_write_head || exit 5
fi
found=$(range_sha 0 "$HEAD_BYTES")
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
                 hasher: str | None = None, faults: str | None = None
                 ) -> subprocess.CompletedProcess:
    """Write packed onto disk with stage 2's own phases; exit 0 when read back intact, its
    log on stderr.

    mode: "all" (write-body, verify, write-head), "write" (write-body alone, without the
    verifiers beside it) or "verify" (the verify phase over what the disk holds: an extent
    that reads back different is written again, as stage 2 does).
    hasher "sha256sum" makes stage 2 hash with sha256sum even where openssl is faster.
    faults: the text of stage2.faults (stage 2's fault points, e.g. "write-extent corrupt 2").
    """
    work.mkdir(parents=True, exist_ok=True)
    data = work / "flash-data"       # where stage 2 finds its faults file
    data.mkdir(exist_ok=True)
    (data / FAULTS_NAME).unlink(missing_ok=True)
    if faults is not None:
        (data / FAULTS_NAME).write_text(faults)
    env = {
        **os.environ, "STAGE2": str(STAGE2), "RESIN_MIGRATE_DISK": disk,
        "RESIN_MIGRATE_WORK": str(work), "RESIN_MIGRATE_REBOOT": "true",
        "DISK": disk, "IMAGE": str(packed), "DATA_MNT": str(data),
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
