"""Every release row of tests.releases through build-flasher's command line, each bundle read
back with the tools a user would reach for: gzip/zstd, debugfs, systemctl --root, mtools,
sfdisk. What is checked is what issue 12 asks of a repacked flasher: the flasher's own
flashing and registration units masked and stage 2's enabled, the initramfs migrator's
trigger gone, the kernel arguments stage 2 can be seen with, the files on flash-boot, the
release recognised, and an inner image that boots a legacy BIOS once stage 2 has written it.

Each row is built once (a module-scoped fixture per row); its build time and bundle size
are printed when the row is built and as a table at the end (``pytest -s``).
``python -m tests.test_build_matrix [ROW ...]`` prints the same table without pytest or
invoke (measure() and format_table() are what a task would call).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pytest

from builder.release import SHAPES, version_key
from runtime.manifest import Manifest, load
from tests.releases import RELEASES, Release
from tests.synthetic import FlasherSpec, cached_flasher
from tests.tools import (
    blkid,
    debugfs_cat,
    decompress,
    extents_sha256,
    fat_files,
    fat_read,
    sfdisk_json,
    sh,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "tests" / "data" / "config.json"
STAGE2 = ROOT / "runtime" / "resin-migrate-stage2"
STAGE2_UNIT = ROOT / "runtime" / "resin-migrate-stage2.service"
STAGE2_PATH = "/usr/bin/resin-migrate-stage2"
#: What a kernel line may not keep: they hide the kernel's and stage 2's messages.
HIDING = ("console=null", "quiet", "splash")
#: The scripts of the flasher's own units: nothing that is enabled may run them.
FLASHER_SCRIPTS = ("resin-init-flasher", "resin-device-register")
UNIT_DIRS = ("etc/systemd/system", "run/systemd/system", "lib/systemd/system",
             "usr/lib/systemd/system")
#: What stage 2's unit may not wait for: a flasher in a migration has no network.
NETWORK_UNITS = ("network", "openvpn", "resin-device-register", "NetworkManager",
                 "balena-device-uuid", "os-config")
BOOT_IMG_MESSAGE = b"GRUB "     # in GRUB's boot.img, the MBR's code (bytes 0..439)
DISKBOOT_MESSAGE = b"loading"   # in diskboot.img, core.img's first sector
#: The words the builder's biosboot edits put in manifest.flasher.edits.
BIOS_EDIT_WORDS = ("boot.img", "core.img", "grub.cfg_internal")


# --------------------------------------------------------------------------- building


@dataclasses.dataclass
class RowBuild:
    """One row through build-flasher: what it took and what it gave."""

    row: str
    release: Release
    flasher: Path
    config: Path
    out: Path
    seconds: float            # wall time of the build-flasher command
    returncode: int
    stdout: str
    stderr: str
    bundle_bytes: int         # the bundle's files, as built
    shape: str | None         # the shape the manifest names

    @property
    def flasher_bytes(self) -> int:
        return self.flasher.stat().st_size

    def manifest(self) -> Manifest:
        return load(str(self.out))


def build_flasher(*args: object) -> subprocess.CompletedProcess:
    """invoke build-flasher, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "invoke", "build-flasher", "--quiet", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True)


def fleet_config(release: Release, directory: Path) -> Path:
    """The fleet's config.json for the row: tests/data/config.json (installer section
    included), with the row's device type where it is not intel-nuc."""
    fleet = json.loads(CONFIG.read_bytes())
    if fleet["deviceType"] == release.slug:
        return CONFIG
    fleet["deviceType"] = release.slug
    path = directory / f"config-{release.slug}.json"
    path.write_text(json.dumps(fleet, indent=2) + "\n")
    return path


def build_row(row: str, work: Path) -> RowBuild:
    """Build the row's synthetic flasher (cached, not timed), then time build-flasher on it;
    the bundle is work/bundle-ROW."""
    release = RELEASES[row]
    flasher = cached_flasher(FlasherSpec(release=release))
    work.mkdir(parents=True, exist_ok=True)
    config = fleet_config(release, work)
    out = work / f"bundle-{row}"
    started = time.monotonic()
    result = build_flasher("--image", flasher, "--out", out, "--config", config)
    seconds = time.monotonic() - started
    built = result.returncode == 0
    return RowBuild(
        row=row, release=release, flasher=flasher, config=config, out=out, seconds=seconds,
        returncode=result.returncode, stdout=result.stdout, stderr=result.stderr,
        bundle_bytes=sum(path.stat().st_size for path in out.iterdir()) if built else 0,
        shape=load(str(out)).flasher.shape if built else None)


def measure(work: Path, rows: Iterable[str] = tuple(RELEASES)) -> list[RowBuild]:
    """Every row built once, one after the other (so that the times compare), into work."""
    return [build_row(row, work / row) for row in rows]


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def format_table(builds: Sequence[RowBuild]) -> str:
    """A Markdown table: per row its release, machine, the shape the builder recognised,
    the flasher's (apparent) size, the build time and the bundle's size."""
    lines = ["| row | release | machine | shape | flasher | build time | bundle |",
             "|---|---|---|---|---|---|---|"]
    for build in builds:
        shape = build.shape if build.returncode == 0 else f"refused (exit {build.returncode})"
        bundle = _mib(build.bundle_bytes) if build.returncode == 0 else "-"
        lines.append(f"| {build.row} | {build.release.version} | {build.release.machine} | "
                     f"{shape} | {_mib(build.flasher_bytes)} | {build.seconds:.1f} s | "
                     f"{bundle} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build every release row with build-flasher "
                                                 "and print build time and bundle size.")
    parser.add_argument("rows", nargs="*", default=list(RELEASES), metavar="ROW",
                        help=f"rows to build (default all: {', '.join(RELEASES)})")
    parser.add_argument("--work", type=Path, help="keep the bundles here (default: removed)")
    args = parser.parse_args(argv)
    unknown = [row for row in args.rows if row not in RELEASES]
    if unknown:
        parser.error(f"unknown rows {', '.join(unknown)}; the rows are {', '.join(RELEASES)}")
    with tempfile.TemporaryDirectory(prefix="build-matrix-") as tmp:
        builds = measure(args.work or Path(tmp), args.rows)
    print(format_table(builds))
    for build in builds:
        if build.returncode != 0:
            print(f"{build.row}: {build.stderr.strip()}", file=sys.stderr)
    return 0 if all(build.returncode == 0 for build in builds) else 1


# --------------------------------------------------------------------------- fixtures

_MEASURED: dict[str, RowBuild] = {}


@pytest.fixture(scope="module", autouse=True)
def _matrix_table() -> Iterator[None]:
    """The table of every row built in this run, printed once the module is done."""
    yield
    if _MEASURED:
        print("\nbuild-flasher, one build per release row:\n" +
              format_table([_MEASURED[row] for row in RELEASES if row in _MEASURED]))


@pytest.fixture(scope="module", params=list(RELEASES))
def built(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> RowBuild:
    """The row's bundle, built once through the command line."""
    build = build_row(request.param, tmp_path_factory.mktemp(f"matrix-{request.param}"))
    _MEASURED[build.row] = build
    print(f"\n{build.row}: build-flasher {build.seconds:.1f} s, bundle "
          f"{_mib(build.bundle_bytes) if build.returncode == 0 else '-'}")
    assert build.returncode == 0, build.stderr
    return build


@dataclasses.dataclass
class Unpacked:
    """The bundle's partitions decompressed, and flash-rootA's tree copied out by debugfs."""

    build: RowBuild
    manifest: Manifest
    boot: Path          # flash-boot, raw
    root: Path          # flash-rootA, raw
    tree: Path          # debugfs rdump of flash-rootA's /

    def unit_file(self, name: str) -> Path | None:
        """The file systemd would load for the unit name (links followed inside the tree)."""
        for directory in UNIT_DIRS:
            path = self.tree / directory / name
            if path.is_symlink() or path.exists():
                return self.resolve(path)
        return None

    def resolve(self, path: Path) -> Path:
        """path with absolute symbolic links taken as relative to the tree's root."""
        for _ in range(16):
            if not path.is_symlink():
                return path
            target = os.readlink(path)
            path = self.tree / target.lstrip("/") if target.startswith("/") else \
                path.parent / target
        raise AssertionError(f"{path}: too many levels of symbolic links")


@pytest.fixture(scope="module")
def unpacked(built: RowBuild, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unpacked]:
    work = tmp_path_factory.mktemp(f"unpacked-{built.row}")
    manifest = built.manifest()
    streams = {part.label: decompress(built.out / part.stream, work / f"{part.label}.img")
               for part in manifest.partitions if part.stream}
    tree = work / "tree"
    tree.mkdir()
    sh("debugfs", "-R", f'rdump / "{tree}"', streams["flash-rootA"])
    yield Unpacked(build=built, manifest=manifest, boot=streams["flash-boot"],
                   root=streams["flash-rootA"], tree=tree)
    shutil.rmtree(work)  # a few hundred MiB per row: gone before the next row is built


# --------------------------------------------------------------------------- the bundle


def _systemctl(tree: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemctl", f"--root={tree}", *args], capture_output=True,
                          text=True)


def _unit_files(tree: Path) -> dict[str, str]:
    """systemctl's state of every unit file in the tree (enabled, masked, static, ...)."""
    listing = _systemctl(tree, "list-unit-files", "--no-legend", "--no-pager")
    assert listing.returncode == 0, listing.stderr
    return {line.split()[0]: line.split()[1] for line in listing.stdout.splitlines()
            if line.strip()}


def _exec_words(text: str) -> list[str]:
    """The program and argument words of every Exec*= line of a unit's text."""
    words = []
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip().startswith("Exec"):
            words += shlex.split(value.strip().lstrip("-@:+!"))
    return words


def _unit_text(unpacked: Unpacked, name: str) -> str:
    """The unit's file and its drop-ins, as one text."""
    path = unpacked.unit_file(name)
    assert path is not None, f"no unit file {name}"
    texts = [path.read_text()] if path.is_file() else []
    for directory in UNIT_DIRS:
        dropins = unpacked.tree / directory / f"{name}.d"
        if dropins.is_dir():
            texts += [conf.read_text() for conf in sorted(dropins.glob("*.conf"))]
    return "\n".join(texts)


def _dependencies(text: str) -> list[str]:
    names = []
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() in ("After", "Wants", "Requires", "Requisite", "BindsTo",
                                   "PartOf", "Upholds"):
            names += value.split()
    return names


def test_the_row_builds_and_the_bundle_verifies(built: RowBuild) -> None:
    assert "bundle written to" in built.stdout
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=built.out,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def _ext4_format(image: Path) -> tuple[list[str], str, str]:
    fields = dict(line.split(":", 1) for line in sh("dumpe2fs", "-h", image).stdout.decode()
                  .splitlines() if ":" in line)
    state = {"needs_recovery", "orphan_present"}     # how it was left, not how it was made
    return (sorted(set(fields["Filesystem features"].split()) - state),
            fields["Block size"].strip(), fields["Inode size"].strip())


def test_the_kernel_filesystem_probe_is_made_like_the_kernels(unpacked: Unpacked,
                                                             tmp_path: Path) -> None:
    """What `check` reads with the device's GRUB: the kernel's filesystem type and (ext4)
    features, block and inode size, and a file at the kernel's path; this host's GRUB reads
    it too."""
    boot = unpacked.manifest.boot
    probe = decompress(unpacked.build.out / boot.probe, tmp_path / "probe.img")
    kernel_fs = unpacked.root if boot.kernel_label == "flash-rootA" else unpacked.boot
    assert blkid(probe)["TYPE"] == blkid(kernel_fs)["TYPE"]
    if boot.kernel_label == "flash-rootA":
        assert _ext4_format(probe) == _ext4_format(kernel_fs)
        data = debugfs_cat(probe, boot.kernel)
    else:
        assert blkid(probe).get("VERSION") == blkid(kernel_fs).get("VERSION")  # FAT16
        data = fat_read(probe, boot.kernel)
    assert hashlib.sha256(data).hexdigest() == boot.probe_sha256 and len(data) == 256 << 10
    read = sh("grub-fstest", probe, "cat", f"(loop0){boot.kernel}").stdout
    assert read == data


def test_only_stage2_starts_when_the_flasher_boots(unpacked: Unpacked) -> None:
    tree = unpacked.tree
    states = _unit_files(tree)
    for name in ("resin-init-flasher.service", "resin-device-register.service"):
        is_enabled = _systemctl(tree, "is-enabled", name)
        assert is_enabled.stdout.strip() == "masked", (name, is_enabled.stdout,
                                                        is_enabled.stderr)
    is_enabled = _systemctl(tree, "is-enabled", "resin-migrate-stage2.service")
    assert is_enabled.stdout.strip() == "enabled", is_enabled.stdout + is_enabled.stderr
    enabled = [name for name, state in states.items() if state == "enabled"]
    assert "resin-migrate-stage2.service" in enabled
    for name in enabled:
        programs = {os.path.basename(word) for word in _exec_words(_unit_text(unpacked, name))}
        assert not programs & set(FLASHER_SCRIPTS), f"{name} is enabled and runs {programs}"


def test_stage2_and_its_unit_are_installed(unpacked: Unpacked) -> None:
    tree = unpacked.tree
    assert (tree / STAGE2_PATH.lstrip("/")).read_bytes() == STAGE2.read_bytes()
    stat = sh("debugfs", "-R", f"stat {STAGE2_PATH}", unpacked.root).stdout.decode()
    assert "Mode:  0755" in stat and "User:     0   Group:     0" in stat
    text = _unit_text(unpacked, "resin-migrate-stage2.service")
    assert text == STAGE2_UNIT.read_text()
    assert STAGE2_PATH in _exec_words(text)
    # it starts without the network: nothing it waits for is network-related
    waits = _dependencies(text)
    assert not [name for name in waits if name.startswith(NETWORK_UNITS)], waits


def test_the_initramfs_migrator_trigger_is_gone(unpacked: Unpacked) -> None:
    flag = unpacked.build.release.flag_file
    # the input had it in its rootfs copy of flash-boot, as image-balena.bbclass puts it
    layout = sfdisk_json(unpacked.build.flasher)["partitions"]
    input_root = f"{unpacked.build.flasher}?offset={layout[1]['start'] * 512}"
    before = sh("debugfs", "-R", f"stat /flash-boot/{flag}", input_root).stderr.decode()
    assert "File not found" not in before, before
    assert (unpacked.tree / "flash-boot").is_dir()
    assert (unpacked.tree / "flash-boot" / "device-type.json").is_file()
    assert not (unpacked.tree / "flash-boot" / flag).exists()
    assert f"/{flag}" in fat_files(unpacked.boot)


def test_kernel_arguments_show_stage2_and_carry_no_grub_variables(unpacked: Unpacked) -> None:
    release, boot = unpacked.build.release, unpacked.manifest.boot
    words = boot.cmdline.split()
    assert not [word for word in words if "${" in word or "$" in word]
    assert not [word for word in words if word in HIDING]
    assert "root=LABEL=flash-rootA" in words
    assert ("flasher" in words) == release.flasher_arg
    assert any(word.startswith("console=ttyS") for word in words), "no serial console"
    assert any(word.startswith("console=tty") and not word.startswith("console=ttyS")
               for word in words), "no screen console"
    # the flasher's own entry, read from flash-boot: what was dropped is exactly its GRUB
    # variables and what hides stage 2, everything else is carried
    grub_cfg = fat_read(unpacked.boot, "/grub/grub.cfg").decode()
    linux = next(line.split() for line in grub_cfg.splitlines()
                 if line.split()[:1] == ["linux"])
    assert linux[1] == boot.kernel
    entry_args = linux[2:]
    assert boot.dropped_args == [word for word in entry_args
                                 if "$" in word or word in HIDING]
    assert {word for word in entry_args if word not in boot.dropped_args} <= set(words)
    assert boot.added_args == [word for word in words if word not in entry_args]


def test_flash_boot_holds_what_stage2_copies_to_resin_boot(unpacked: Unpacked) -> None:
    build = unpacked.build
    files = fat_files(unpacked.boot)
    fleet = json.loads(build.config.read_bytes())
    assert "installer" in fleet  # the test's fleet config has one, so its removal shows
    del fleet["installer"]
    assert json.loads(fat_read(unpacked.boot, "/config.json")) == fleet
    device_type = json.loads(fat_read(unpacked.boot, "/device-type.json"))
    assert device_type["slug"] == build.release.slug == fleet["deviceType"]
    # system-proxy/ samples ship from meta-balena v2.108.30 (tests.releases)
    wanted = ["splash", "system-connections"] + (
        ["system-proxy"] if build.release.system_proxy else [])
    for directory in wanted:
        assert any(path.startswith(f"/{directory}/") for path in files), (directory, files)
    assert "/grub.cfg_internal" in files


def test_the_manifest_names_the_release_recognised(unpacked: Unpacked) -> None:
    release, flasher = unpacked.build.release, unpacked.manifest.flasher
    os_release = dict(
        (key, value.strip('"')) for key, _, value in
        (line.partition("=") for line in
         (unpacked.tree / "etc" / "os-release").read_text().splitlines()) if value)
    # VERSION: the board's version (VERSION_ID is the same from meta-balena v2.38.0 on;
    # before, meta-resin's version without the board's +revN)
    assert flasher.release == os_release["VERSION"] == release.version
    assert os_release["VERSION_ID"] == (release.version if release.meta_balena
                                        else release.version.split("+")[0])
    assert flasher.machine == os_release["MACHINE"] == release.machine
    assert flasher.slug == release.slug
    assert flasher.flag_file == f"/{release.flag_file}"
    shape = {shape.name: shape for shape in SHAPES}[flasher.shape]
    assert shape.since <= version_key(release.version)
    if release.meta_balena:
        assert flasher.meta_balena == release.meta_balena


def _rebuild_inner_image(unpacked: Unpacked, work: Path) -> Path:
    """The raw image stage 2 will write: flash-rootA's packed image (debugfs dump),
    decompressed by its tool, each extent put at its offset in a sparse file of the image's
    raw size."""
    inner = unpacked.manifest.inner_image
    packed = work / "packed"
    sh("debugfs", "-R", f'dump {inner.path} "{packed}"', unpacked.root)
    tool = {"gzip": "gzip", "zstd": "zstd"}[inner.compression]
    stream = work / "stream"
    with stream.open("wb") as out:
        subprocess.run([tool, "-dc", str(packed)], stdout=out, check=True)
    assert stream.stat().st_size == inner.stream_size
    image = work / "inner.img"
    with stream.open("rb") as src, image.open("wb") as dst:
        dst.truncate(inner.raw_size)
        for start, length, _ in inner.extents:
            dst.seek(start)
            dst.write(src.read(length))
    stream.unlink()
    assert extents_sha256(image, inner.extents) == inner.stream_sha256
    return image


def test_the_written_image_boots_a_legacy_bios(unpacked: Unpacked, tmp_path: Path) -> None:
    image = _rebuild_inner_image(unpacked, tmp_path)
    with image.open("rb") as handle:
        head = handle.read(1024)
    assert BOOT_IMG_MESSAGE in head[:440], "no GRUB boot code in the MBR"
    assert DISKBOOT_MESSAGE in head[512:1024], "no core.img in sector 1"
    table = sfdisk_json(image)
    assert table["label"] == "dos"
    resin_boot = f"{image}@@{table['partitions'][0]['start'] * 512}"
    assert sh("mlabel", "-s", "-i", resin_boot, "::").stdout.decode().split() [-1:] == [
        "resin-boot"]
    modules = sh("mdir", "-i", resin_boot, "-/", "-b", "::/grub").stdout.decode()
    assert "/grub/i386-pc/normal.mod" in modules, "core.img would find no normal mode"
    grub_cfg = sh("mcopy", "-n", "-i", resin_boot, "::/grub/grub.cfg", "-").stdout
    assert grub_cfg == fat_read(unpacked.boot, "/grub.cfg_internal")
    bios_edits = [edit for edit in unpacked.manifest.flasher.edits
                  if any(word in edit for word in BIOS_EDIT_WORDS)]
    if unpacked.build.release.image_boots_bios:
        assert bios_edits == [], "the image boots a BIOS by itself; the builder changed it"
    else:  # 2.12: the flasher's post-steps, done by the builder
        assert len(bios_edits) == 2, unpacked.manifest.flasher.edits


if __name__ == "__main__":
    sys.exit(main())
