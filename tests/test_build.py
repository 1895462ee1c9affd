"""invoke build-flasher on the synthetic flasher: the bundle, read back with independent tools."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from builder.progress import Progress
from builder.repack import BuildOptions, BuildResult, build
from runtime.manifest import load
from tests.releases import DEFAULT
from tests.synthetic import build_resinos_image, cached_flasher
from tests.tools import (
    blkid,
    debugfs_cat,
    debugfs_stat,
    decompress,
    e2fsck_clean,
    extents_sha256,
    fat_files,
    fat_read,
    sfdisk_json,
    sh,
    sha256,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "tests" / "data" / "config.json"
STAGE2 = ROOT / "runtime" / "resin-migrate-stage2"
STAGE2_PATH = "/usr/bin/resin-migrate-stage2"
INNER_NAME = DEFAULT.inner_name
QUIET = Progress(quiet=True)
KEYFILE = b"""[connection]
id=office-wifi
type=wifi

[wifi]
ssid=office

[wifi-security]
key-mgmt=wpa-psk
psk=not-a-real-secret
"""


@pytest.fixture(scope="module")
def network_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("network")
    (directory / "office-wifi").write_bytes(KEYFILE)
    (directory / "wired-static.nmconnection").write_bytes(b"[connection]\nid=wired\n")
    return directory


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, network_dir: Path) -> BuildResult:
    out = tmp_path_factory.mktemp("dist") / "nuc"
    return build(BuildOptions(image=cached_flasher(), out=out, config=CONFIG,
                              network=network_dir), QUIET)


@pytest.fixture(scope="module")
def streams(built: BuildResult, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each partition stream of the bundle, decompressed with the gzip/zstd tools."""
    work = tmp_path_factory.mktemp("streams")
    return {part.label: decompress(built.out / part.stream, work / f"{part.label}.img")
            for part in built.manifest.partitions if part.stream}


def test_bundle_holds_the_files_and_sha256sum_accepts_them(built: BuildResult) -> None:
    names = sorted(path.name for path in built.out.iterdir())
    assert names == ["SHA256SUMS", "flash-boot.gz", "flash-rootA.gz", "kernel-fs-probe.gz",
                     "manifest.json", "resin-migrate.pyz"]
    # flash-boot.gz carries the fleet's API key (config.json) and any WiFi keys
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in built.out.iterdir()}
    assert modes == {"SHA256SUMS": 0o644, "flash-boot.gz": 0o600, "flash-rootA.gz": 0o644,
                     "kernel-fs-probe.gz": 0o644, "manifest.json": 0o644,
                     "resin-migrate.pyz": 0o755}
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=built.out,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": OK") == 5
    # nothing else was left beside the bundle (staging and work directories removed)
    assert sorted(path.name for path in built.out.parent.iterdir()) == ["nuc"]


def test_manifest_describes_the_device_partitions(built: BuildResult) -> None:
    manifest = load(str(built.out))
    assert manifest == built.manifest
    assert [(p.label, p.fs, p.grows, p.stream) for p in manifest.partitions] == [
        ("flash-boot", "vfat", False, "flash-boot.gz"),
        ("flash-rootA", "ext4", False, "flash-rootA.gz"),
        ("flash-data", "ext4", True, None)]
    assert manifest.partition("flash-boot").flags == ["boot", "lba"]
    flasher = sfdisk_json(cached_flasher())["partitions"]
    assert manifest.partition("flash-boot").size == flasher[0]["size"] * 512
    for stream in manifest.streams:
        assert stream.compression == "gzip"
        assert (built.out / stream.file).stat().st_size == stream.size
    # the default row (a current release) boots /boot/bzImage from flash-rootA
    assert manifest.boot.kernel_label == "flash-rootA"
    assert manifest.boot.kernel == DEFAULT.kernel_path == "/boot/bzImage"
    assert "root=LABEL=flash-rootA" in manifest.boot.cmdline.split()
    assert manifest.flasher.release == DEFAULT.version
    assert manifest.flasher.flag_file == f"/{DEFAULT.flag_file}"
    assert manifest.source.format == "raw"
    assert manifest.source.sha256 == sha256(cached_flasher())
    assert manifest.flasher_decompressors == ["gzip", "zstd"]


def test_streams_expand_to_the_sizes_and_hashes_in_the_manifest(built, streams) -> None:
    for part in built.manifest.partitions:
        if not part.stream:
            continue
        stream = built.manifest.stream(part.stream)
        raw = streams[part.label]
        assert raw.stat().st_size == stream.raw_size == part.size
        assert sha256(raw) == stream.raw_sha256


def test_flash_boot_carries_the_fleet_config_and_network_files(streams) -> None:
    boot = streams["flash-boot"]
    found = blkid(boot)
    assert (found["LABEL"], found["TYPE"], found["VERSION"]) == ("flash-boot", "vfat", "FAT16")
    assert sh("fsck.vfat", "-n", boot, check=False).returncode == 0
    # the fleet's config.json, without the installer section that steers only the flasher
    fleet = json.loads(CONFIG.read_bytes())
    assert "installer" in fleet
    del fleet["installer"]
    assert json.loads(fat_read(boot, "/config.json")) == fleet
    assert fat_read(boot, "/system-connections/office-wifi") == KEYFILE
    files = fat_files(boot)
    assert f"/{DEFAULT.flag_file}" in files and "/grub/grub.cfg" in files
    assert "/system-connections/wired-static.nmconnection" in files


def test_the_manifest_names_the_fleet_network_files(built) -> None:
    assert built.manifest.network_files == ["office-wifi", "wired-static.nmconnection"]


def test_flash_roota_holds_stage2_and_the_compressed_image(built, streams, tmp_path) -> None:
    root = streams["flash-rootA"]
    found = blkid(root)
    assert (found["LABEL"], found["TYPE"]) == ("flash-rootA", "ext4")
    check = e2fsck_clean(root)
    assert check.returncode == 0, check.stdout
    assert debugfs_cat(root, STAGE2_PATH) == STAGE2.read_bytes()
    stat = debugfs_stat(root, STAGE2_PATH)
    assert "Mode:  0755" in stat and "User:     0   Group:     0" in stat
    inner = built.manifest.inner_image
    assert inner.original_path == f"/opt/{INNER_NAME}"
    assert inner.path == f"/opt/{INNER_NAME}.zst" and inner.compression == "zstd"
    listing = sh("debugfs", "-R", "ls -p /opt", root).stdout.decode()
    assert f"/{INNER_NAME}.zst/" in listing and f"/{INNER_NAME}/" not in listing
    packed = tmp_path / "inner.zst"
    packed.write_bytes(debugfs_cat(root, inner.path))
    assert sha256(packed) == inner.sha256
    original = tmp_path / "original.img"
    build_resinos_image(original)
    # the packed file is the image's extents one after the other
    expanded = decompress(packed, tmp_path / "inner.stream")
    assert sha256(original) == inner.raw_sha256
    assert original.stat().st_size == inner.raw_size
    assert sha256(expanded) == inner.stream_sha256 == extents_sha256(original, inner.extents)
    assert expanded.stat().st_size == inner.stream_size < inner.raw_size
    table = sfdisk_json(original)
    assert table["label"] == "dos"
    assert [p["start"] for p in table["partitions"]] == [
        p.start for p in inner.layout.partitions]
    data = inner.layout.by_label("resin-data")
    with original.open("rb") as src, (tmp_path / "data.img").open("wb") as dst:
        src.seek(data.start * 512)
        dst.write(src.read(data.size * 512))
    fields = dict(line.split(":", 1) for line in sh("dumpe2fs", "-h", tmp_path / "data.img")
                  .stdout.decode().splitlines() if ":" in line)
    assert inner.data_free == int(fields["Free blocks"]) * int(fields["Block size"])
    assert [p.label for p in inner.layout.partitions] == [
        "resin-boot", "resin-rootA", "resin-rootB", None, "resin-state", "resin-data"]


def test_flash_roota_was_shrunk_to_what_it_holds(built, streams) -> None:
    flasher_root = sfdisk_json(cached_flasher())["partitions"][1]["size"] * 512
    size = built.manifest.partition("flash-rootA").size
    inner = built.manifest.inner_image
    assert size < flasher_root / 2
    assert size % (4 << 20) == 0
    header = dict(line.split(":", 1) for line in sh("dumpe2fs", "-h", streams["flash-rootA"])
                  .stdout.decode().splitlines() if ":" in line)
    # the journal keeps the size mke2fs gave the input's (larger) filesystem
    journal = int(header["Total journal size"].strip().removesuffix("M")) << 20
    # what it holds plus headroom, no more: the compressed image takes most of it
    assert inner.size < size < inner.size + journal + (48 << 20)
    assert int(header["Free blocks"]) * 4096 >= 8 << 20


@pytest.mark.parametrize("python", [sys.executable, "/usr/bin/python3"])
def test_the_runtime_zipapp_runs(built: BuildResult, python: str) -> None:
    if not Path(python).exists():
        pytest.skip(f"{python} is not installed")
    pyz = built.out / "resin-migrate.pyz"
    assert os.access(pyz, os.X_OK)
    help_text = subprocess.run([python, str(pyz), "--help"], capture_output=True, text=True,
                               cwd="/")
    assert help_text.returncode == 0, help_text.stderr
    assert "verify" in help_text.stdout and "exit codes" in help_text.stdout
    verified = subprocess.run([python, str(pyz), "verify"], capture_output=True, text=True,
                              cwd="/")
    assert verified.returncode == 0, verified.stderr
    assert "ok  flash-rootA.gz" in verified.stdout


def _pythons_before_3_4() -> list[str]:
    """The interpreters older than the runtime's 3.4 that pyenv holds on this machine."""
    versions = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    found = []
    for python in sorted(versions.glob("*/bin/python")):
        parts = python.parent.parent.name.split(".")[:2]
        if all(part.isdigit() for part in parts) and tuple(map(int, parts)) < (3, 4):
            found.append(str(python))
    return found


@pytest.mark.parametrize("python", _pythons_before_3_4() or [None],
                         ids=lambda python: Path(python).parent.parent.name if python else "none")
def test_an_older_python_is_refused_with_a_sentence(built: BuildResult,
                                                    python: str | None) -> None:
    """The zipapp's first module parses on Python 2.7 and 3.3 (builder/bundle.py PYZ_MAIN,
    runtime/stdlib.py): a sentence naming the interpreter and exit code 5, no SyntaxError."""
    if python is None:
        pytest.skip("no Python older than 3.4 under $(pyenv root)/versions")
    version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    result = subprocess.run([python, str(built.out / "resin-migrate.pyz"), "check"],
                            capture_output=True, text=True, cwd="/")
    assert result.returncode == 5, result.stderr
    assert result.stderr.startswith(f"resin-migrate needs Python 3.4 or later; this is Python "
                                    f"{version} ({python})."), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_verify_names_a_damaged_stream(built: BuildResult, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(built.out, copy)
    stream = copy / "flash-boot.gz"
    data = bytearray(stream.read_bytes())
    data[len(data) // 2] ^= 1
    stream.write_bytes(bytes(data))
    result = subprocess.run([sys.executable, str(copy / "resin-migrate.pyz"), "verify"],
                            capture_output=True, text=True)
    assert result.returncode == 4
    assert "flash-boot.gz" in result.stderr and "differs from the manifest" in result.stderr


def test_two_builds_are_byte_identical(built: BuildResult, network_dir: Path,
                                       tmp_path: Path) -> None:
    again = build(BuildOptions(image=cached_flasher(), out=tmp_path / "again", config=CONFIG,
                               network=network_dir), QUIET)
    for path in sorted(built.out.iterdir()):
        assert (again.out / path.name).read_bytes() == path.read_bytes(), path.name

