"""Stage 2 (runtime/resin-init-flasher) on a disk exactly as stage 1 leaves it.

The disk is made by running stage 1 itself on a legacy Debian disk. The refusals run on
this host's loop devices; the full write needs resin-boot (FAT) mounted, which only a
real kernel with vfat can do, so it runs inside a QEMU VM.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.rig.legacy import LegacySpec, SwapPlacement, attached, copy_legacy_image, mounted_root
from tests.test_stage1 import MOUNT_OPTIONS, PYTHON, backup_script_for
from tests.tools import sfdisk_json, sh

ROOT = Path(__file__).resolve().parent.parent
STAGE2 = ROOT / "runtime" / "resin-init-flasher"


def make_stage1_disk(spec: LegacySpec, bundle: Path, dest: Path) -> Path:
    """A legacy disk after `resin-migrate.pyz stage1` (with a backup of /srv/appdata)."""
    image = copy_legacy_image(spec, dest)
    with attached(image, spec) as dev, mounted_root(dev, options=MOUNT_OPTIONS) as sysroot:
        script = backup_script_for(sysroot, dest.parent)
        result = subprocess.run(
            [PYTHON, str(bundle / "resin-migrate.pyz"), "--bundle", str(bundle), "--disk",
             dev.device, "--sysroot", str(sysroot), "stage1", "--yes", "--backup-script",
             str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    return image


def flash_numbers(image: Path) -> dict[str, int]:
    parts = sfdisk_json(image)["partitions"]
    labels = {}
    for part in parts:
        number = int(part["node"][len(str(image)):])
        found = subprocess.run(["blkid", "-p", "-o", "value", "-s", "LABEL", "-O",
                                str(part["start"] * 512), "-S", str(part["size"] * 512),
                                str(image)], capture_output=True, text=True).stdout.strip()
        if found:
            labels[found] = number
    return labels


def digest_outside(image: Path, skip: tuple[int, int]) -> str:
    """sha256 of the image's bytes outside [skip) (in sectors): all but flash-data."""
    digest = hashlib.sha256()
    start, end = skip[0] * 512, skip[1] * 512
    with image.open("rb") as handle:
        for lo, hi in ((0, start), (end, image.stat().st_size)):
            handle.seek(lo)
            remaining = hi - lo
            while remaining:
                chunk = handle.read(min(remaining, 1 << 22))
                digest.update(chunk)
                remaining -= len(chunk)
    return digest.hexdigest()


@contextmanager
def mounted(device: str, path: Path, options: str = "ro") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    sh("mount", "-o", options, device, path)
    try:
        yield path
    finally:
        sh("umount", path)


def run_stage2_on_host(disk: str, root: Path,
                       work: Path) -> tuple[subprocess.CompletedProcess, Path]:
    marker = work / "rebooted"
    env = {**os.environ, "RESIN_MIGRATE_DISK": disk, "RESIN_MIGRATE_ROOT": str(root),
           "RESIN_MIGRATE_REBOOT": f"touch {marker}", "RESIN_MIGRATE_WORK": str(work / "w")}
    result = subprocess.run(["bash", str(STAGE2)], env=env, capture_output=True, text=True,
                            timeout=600)
    return result, marker


def _flip_image_byte(dev: str, numbers: dict[str, int], tmp: Path) -> None:
    with mounted(f"{dev}p{numbers['flash-rootA']}", tmp / "rootA-rw", "rw") as root:
        image = next((root / "opt").glob("*.zst"))
        with image.open("r+b") as handle:
            handle.seek(image.stat().st_size // 2)
            byte = handle.read(1)
            handle.seek(-1, os.SEEK_CUR)
            handle.write(bytes([byte[0] ^ 0x01]))


def _remove_env(dev: str, numbers: dict[str, int], tmp: Path) -> None:
    with mounted(f"{dev}p{numbers['flash-data']}", tmp / "data-rw", "rw") as data:
        (data / "stage2.env").unlink()


def _overlapping_image(dev: str, numbers: dict[str, int], tmp: Path) -> None:
    with mounted(f"{dev}p{numbers['flash-data']}", tmp / "data-rw", "rw") as data:
        env = (data / "stage2.env").read_text().splitlines()
        env = ["RM_FLASH_START='8192'" if line.startswith("RM_FLASH_START=") else line
               for line in env]
        (data / "stage2.env").write_text("\n".join(env) + "\n")


@pytest.mark.loop
@pytest.mark.parametrize(("harm", "reason"), [
    (_flip_image_byte, "the image is damaged"),
    (_remove_env, "stage2.env is missing"),
    (_overlapping_image, "would overwrite the flash partitions"),
], ids=["flipped-byte", "missing-env", "overlap"])
def test_refusal_before_the_point_of_no_return(harm, reason, tmp_path: Path,
                                               synthetic_bundle: Path) -> None:
    image = make_stage1_disk(LegacySpec(placement=SwapPlacement.LOGICAL), synthetic_bundle,
                             tmp_path / "disk.img")
    numbers = flash_numbers(image)
    data = next(p for p in sfdisk_json(image)["partitions"]
                if p["node"].endswith(str(numbers["flash-data"])))
    data_range = (data["start"], data["start"] + data["size"])
    with attached(image) as dev:
        harm(dev.device, numbers, tmp_path)
        before = digest_outside(image, data_range)
        with mounted(f"{dev.device}p{numbers['flash-rootA']}", tmp_path / "rootA") as root:
            result, marker = run_stage2_on_host(dev.device, root, tmp_path)
        assert result.returncode == 1, result.stderr
        assert marker.exists(), "the reboot command was not called"
        assert reason in result.stderr
        with mounted(f"{dev.device}p{numbers['flash-data']}", tmp_path / "data") as data_dir:
            log = (data_dir / "resin-migrate-stage2.log").read_text()
        assert reason in log and "nothing was written" in log
    assert digest_outside(image, data_range) == before
