"""build-flasher through its command line: other flasher variants, and every refusal.

A refusal is one paragraph on stderr (no traceback), a documented exit code, nothing at
--out and nothing left beside it.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from runtime.manifest import load
from tests.releases import DEFAULT, RELEASES
from tests.synthetic import FlasherSpec, build_resinos_image, cached_flasher
from tests.tools import debugfs_cat, decompress, extents_sha256, sfdisk_json, sh, sha256

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "tests" / "data" / "config.json"


def build_flasher(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "invoke", "build-flasher", "--quiet", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True)


def _tree(directory: Path) -> dict[str, str]:
    return {str(path.relative_to(directory)): sha256(path)
            for path in sorted(directory.rglob("*")) if path.is_file()}


def test_zip_input_gives_the_same_streams_as_raw(tmp_path: Path) -> None:
    flasher = cached_flasher()
    packed = tmp_path / "resin-intel-nuc-2.x-flasher.img.zip"
    with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.write(flasher, "resin-intel-nuc-2.x-flasher.img")
    from_zip = build_flasher("--image", packed, "--out", tmp_path / "zip")
    from_raw = build_flasher("--image", flasher, "--out", tmp_path / "raw")
    assert from_zip.returncode == 0 and from_raw.returncode == 0, from_zip.stderr
    zip_manifest, raw_manifest = load(str(tmp_path / "zip")), load(str(tmp_path / "raw"))
    assert zip_manifest.source.format == "zip"
    assert zip_manifest.source.sha256 == sha256(packed)
    assert zip_manifest.streams == raw_manifest.streams
    assert "bundle written to" in from_zip.stdout


def test_flasher_without_zstd_gets_a_gzip_inner_image(tmp_path: Path) -> None:
    result = build_flasher("--image", cached_flasher(FlasherSpec(with_zstd=False)),
                           "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    manifest = load(str(tmp_path / "out"))
    inner = manifest.inner_image
    assert manifest.flasher_decompressors == ["gzip"]
    assert inner.compression == "gzip" and inner.path == f"/opt/{DEFAULT.inner_name}.gz"
    root = decompress(tmp_path / "out" / "flash-rootA.gz", tmp_path / "rootA.img")
    packed = tmp_path / "inner.gz"
    packed.write_bytes(debugfs_cat(root, inner.path))
    original = tmp_path / "original.img"
    build_resinos_image(original)
    assert sha256(original) == inner.raw_sha256
    assert sha256(decompress(packed, tmp_path / "inner.img")) == inner.stream_sha256 == \
        extents_sha256(original, inner.extents)


def test_newer_flasher_naming_and_grub_entry(tmp_path: Path) -> None:
    # balena names, /boot/bzImage in flash-rootA, `flasher` (the 2.95 row; see tests.releases)
    spec = FlasherSpec(release=RELEASES["2.95"])
    result = build_flasher("--image", cached_flasher(spec), "--out", tmp_path / "out",
                           "--compression", "gzip", "--stream-compression", "zstd")
    assert result.returncode == 0, result.stderr
    manifest = load(str(tmp_path / "out"))
    assert manifest.inner_image.path == "/opt/balena-image-genericx86-64.balenaos-img.gz"
    assert (manifest.boot.kernel_label, manifest.boot.kernel) == ("flash-rootA", "/boot/bzImage")
    assert "flasher" in manifest.boot.cmdline.split()
    assert [stream.file for stream in manifest.streams] == ["flash-boot.zst", "flash-rootA.zst",
                                                            "kernel-fs-probe.zst"]


def _corrupt_zip(tmp: Path) -> Path:
    packed = tmp / "flasher.zip"
    with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.write(cached_flasher(), "flasher.img")
    data = bytearray(packed.read_bytes())
    for offset in range(len(data) // 2, len(data) // 2 + 256):
        data[offset] ^= 0xFF
    packed.write_bytes(bytes(data))
    return packed


def _truncated_gzip(tmp: Path) -> Path:
    packed = tmp / "flasher.img.gz"
    with cached_flasher().open("rb") as raw, gzip.open(packed, "wb", compresslevel=1) as out:
        shutil.copyfileobj(raw, out)
    with packed.open("r+b") as handle:
        handle.truncate(packed.stat().st_size // 2)
    return packed


def _truncated_raw(tmp: Path) -> Path:
    image = tmp / "flasher.img"
    shutil.copyfile(cached_flasher(), image)
    with image.open("r+b") as handle:
        handle.truncate(image.stat().st_size // 2)
    return image


def _garbage(tmp: Path) -> Path:
    path = tmp / "flasher.img"
    path.write_bytes(b"<html>404 Not Found</html>\n" * 40)
    return path


def _duplicate_label(tmp: Path) -> Path:
    """The default flasher with flash-rootB's filesystem labelled flash-rootA too (debugfs
    on the copy at the partition's offset)."""
    image = tmp / "flasher.img"
    sh("cp", "--sparse=always", cached_flasher(), image)
    offset = sfdisk_json(image)["partitions"][2]["start"] * 512
    sh("debugfs", "-w", "-R", "ssv volume_name flash-rootA", f"{image}?offset={offset}")
    return image


def _resinos_image(tmp: Path) -> Path:
    path = tmp / "resinos.img"
    build_resinos_image(path)
    return path


@pytest.mark.parametrize(("make_input", "extra", "code", "message"), [
    (_garbage, (), 3, "found 'HTML document"),
    (_corrupt_zip, (), 3, "corrupt or truncated"),
    (_truncated_gzip, (), 3, "corrupt or truncated"),
    (_truncated_raw, (), 3, "truncated"),
    (lambda tmp: cached_flasher(FlasherSpec(with_rootA=False)), (), 4,
     "no partition labelled flash-rootA"),
    (lambda tmp: cached_flasher(FlasherSpec(with_inner_image=False)), (), 4,
     "expected one resinOS image"),
    (_resinos_image, (), 4, "no partition labelled flash-boot"),
    (_duplicate_label, (), 4, "a filesystem label appears twice"),
    (lambda tmp: cached_flasher(FlasherSpec(with_zstd=False)), ("--compression", "zstd"), 5,
     "no zstd binary"),
    (lambda tmp: cached_flasher(), ("--config", ROOT / "README.md"), 5, "not valid JSON"),
    (lambda tmp: cached_flasher(), ("--compression", "lz4"), 5, "expected one of gzip, zstd"),
], ids=["garbage", "corrupt-zip", "truncated-gzip", "truncated-raw", "no-rootA",
        "no-inner-image", "resinos-not-flasher", "duplicate-label", "zstd-unavailable",
        "config-not-json",
        "unknown-compression"])
def test_bad_input_is_refused_and_leaves_nothing(make_input, extra, code, message,
                                                 tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image = make_input(inputs)
    dist = tmp_path / "dist"
    result = build_flasher("--image", image, "--out", dist / "nuc", *extra)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("build-flasher: ")
    assert not (dist / "nuc").exists()
    assert not dist.exists() or list(dist.iterdir()) == []


def _with_os_release(tmp: Path, **fields: str) -> Path:
    """A copy of the default flasher whose flash-rootA /etc/os-release has fields changed,
    edited in the copy with debugfs -w at the partition's offset (no root, no mount)."""
    image = tmp / "flasher.img"
    sh("cp", "--sparse=always", cached_flasher(), image)
    offset = sfdisk_json(image)["partitions"][1]["start"] * 512
    rootfs = f"{image}?offset={offset}"
    lines = debugfs_cat(rootfs, "/etc/os-release").decode().splitlines()
    edited = [next((f'{key}="{fields[key]}"' for key in fields if line.startswith(key + "=")),
                   line) for line in lines]
    assert edited != lines
    local = tmp / "os-release"
    local.write_text("\n".join(edited) + "\n")
    commands = tmp / "debugfs-commands"
    commands.write_text(f"rm /etc/os-release\nwrite {local} /etc/os-release\n")
    sh("debugfs", "-w", "-f", commands, rootfs)
    # debugfs exits 0 when a command fails: read the edit back
    assert debugfs_cat(rootfs, "/etc/os-release") == local.read_bytes()
    return image


def _ext_fleet_config(tmp: Path) -> Path:
    """The test fleet's config.json, for a fleet of genericx86-64-ext devices."""
    config = json.loads(CONFIG.read_bytes())
    config["deviceType"] = "genericx86-64-ext"
    path = tmp / "config.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def _spec(**knobs: bool):
    return lambda tmp: (cached_flasher(FlasherSpec(**knobs)), ())


@pytest.mark.parametrize(("make_input", "code", "found", "todo"), [
    (_spec(gpt=True), 4, "a GPT partition table", "download one of those"),
    (_spec(signed=True), 4, "a signed (secure boot) flasher (/opt/balena-image-",
     "Use the unsigned flasher of the same release"),
    # flash-boot keeps its BIOS GRUB: the image itself has none (no /grub/i386-pc)
    (_spec(efi_only=True), 4, "the resinOS image boots by EFI only", "use a newer flasher"),
    (_spec(with_flasher_unit=False), 4, "no unit runs resin-init-flasher",
     "use an unmodified intel-nuc or genericx86-64-ext flasher"),
    (lambda tmp: (cached_flasher(), ("--config", _ext_fleet_config(tmp))), 5,
     "deviceType 'genericx86-64-ext', but this flasher is for 'intel-nuc'",
     "Download the genericx86-64-ext flasher"),
    (lambda tmp: (_with_os_release(tmp, MACHINE="generic-amd64"), ()), 4,
     "balenaOS 6.10.24 for generic-amd64 (balena-generic)",
     "Download the intel-nuc or genericx86-64-ext flasher"),
    (lambda tmp: (_with_os_release(tmp, MACHINE="raspberrypi4-64"), ()), 4,
     "for the machine raspberrypi4-64", "download the intel-nuc or genericx86-64-ext"),
    (lambda tmp: (_with_os_release(tmp, VERSION="1.30.1", VERSION_ID="1.30.1"), ()), 4,
     "resinOS 1.30.1 is a 1.x release", "needs a 2.x or later flasher"),
], ids=["gpt", "signed", "efi-only", "unknown-units", "device-type-mismatch", "generic-amd64",
        "other-machine", "release-1.x"])
def test_flasher_it_cannot_repack_is_refused_and_nothing_changes(
        make_input, code, found, todo, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image, extra = make_input(inputs)
    given = [image, *(arg for arg in extra if isinstance(arg, Path))]
    before = {path: sha256(path) for path in given}
    dist = tmp_path / "dist"
    result = build_flasher("--image", image, "--out", dist / "nuc", *extra)
    assert result.returncode == code, result.stderr
    message = result.stderr.strip()
    # one paragraph: what was found, and what to do
    assert message.startswith("build-flasher: ") and "\n\n" not in message, message
    assert "Traceback" not in message
    assert found in message and todo in message, message
    assert not dist.exists() or list(dist.iterdir()) == []
    assert {path: sha256(path) for path in given} == before


def test_non_empty_out_is_refused_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "nuc"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    before = _tree(tmp_path)
    refused = build_flasher("--image", cached_flasher(), "--out", out)
    assert refused.returncode == 5
    assert "not empty" in refused.stderr and "--force" in refused.stderr
    assert _tree(tmp_path) == before
    forced = build_flasher("--image", cached_flasher(), "--out", out, "--force")
    assert forced.returncode == 0, forced.stderr
    assert sorted(_tree(out)) == ["SHA256SUMS", "flash-boot.gz", "flash-rootA.gz",
                                  "kernel-fs-probe.gz", "manifest.json", "resin-migrate.pyz"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["nuc"]


def test_python_m_builder_verbose_shows_every_command(tmp_path: Path) -> None:
    """`python -m builder` is build-flasher; --verbose logs each command it runs, as the
    runtime's -v does (runtime/run.py), the stream compressor's included."""
    result = subprocess.run([sys.executable, "-m", "builder", "--image", str(cached_flasher()),
                             "--out", str(tmp_path / "nuc"), "--quiet", "--verbose"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    commands = [line[len("run: "):].split()[0] for line in result.stderr.splitlines()
                if line.startswith("run: ")]
    assert {"debugfs", "mcopy", "e2fsck"} <= set(commands), commands
    assert "bundle written to" in result.stdout
    quiet = subprocess.run([sys.executable, "-m", "builder", "--image", str(cached_flasher()),
                            "--out", str(tmp_path / "nuc2"), "--quiet"],
                           cwd=ROOT, capture_output=True, text=True)
    assert quiet.returncode == 0 and "run: " not in quiet.stderr, quiet.stderr


def test_help_lists_options_and_exit_codes() -> None:
    result = subprocess.run([sys.executable, "-m", "invoke", "build-flasher", "--help"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    for word in ("--image", "--config", "--network", "--compression", "--out", "--force",
                 "--quiet", "--verbose", "Exit codes"):
        assert word in result.stdout
    # the exit codes, defined once (builder/errors.py), in python -m builder's help too
    from builder.errors import EXIT_CODES
    direct = subprocess.run([sys.executable, "-m", "builder", "--help"], cwd=ROOT,
                            capture_output=True, text=True)
    assert direct.returncode == 0 and EXIT_CODES.strip() in direct.stdout
