"""Checks of the synthetic image builders with independent tools (sfdisk, blkid, e2fsck,
debugfs, dumpe2fs, mtools). No root needed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.synthetic import (
    INNER_NAME,
    CommandError,
    FlasherSpec,
    build_flasher_image,
    build_resinos_image,
    cache_dir,
    cached_flasher,
)

MiB = 1 << 20
S = 512  # sector
ALIGN_S = 8192  # 4 MiB in sectors
BALENA_NAME = "balena-image-genericx86-64.balenaos-img"
ENV = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin", "LC_ALL": "C"}


# ----------------------------------------------------------------------------- helpers


def sh(*argv: object, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=ENV)
    assert proc.returncode in ok, f"{argv}: exit {proc.returncode}: {proc.stderr}"
    return proc


def table(img: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(sh("sfdisk", "--json", img).stdout)
    return result["partitiontable"]  # type: ignore[no-any-return]


def parts(img: Path) -> dict[int, dict[str, Any]]:
    return {int(p["node"][len(str(img)) :]): p for p in table(img)["partitions"]}


def probe(img: Path, part: dict[str, Any]) -> dict[str, str]:
    """blkid low-level probe of one partition; {} when nothing is found."""
    proc = sh(
        "blkid",
        "-p",
        "-o",
        "export",
        "-O",
        part["start"] * S,
        "-S",
        part["size"] * S,
        img,
        ok=(0, 2),
    )
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def extract(img: Path, part: dict[str, Any], out: Path) -> Path:
    assert part["start"] % ALIGN_S == 0 and part["size"] % ALIGN_S == 0
    sh(
        "dd",
        f"if={img}",
        f"of={out}",
        "bs=4M",
        f"skip={part['start'] // ALIGN_S}",
        f"count={part['size'] // ALIGN_S}",
        "conv=sparse",
        "status=none",
    )
    return out


def debugfs(fs: Path, request: str) -> str:
    return sh("debugfs", "-R", request, fs).stdout


def stat_fields(fs: Path, path: str) -> dict[str, str]:
    out = debugfs(fs, f"stat {path}")
    assert "Inode:" in out, f"{path} not found in {fs}"
    words = out.replace(":", " ").split()
    return {k: words[words.index(k) + 1] for k in ("User", "Group", "Size", "Mode")}


def mdir_files(img: Path, part: dict[str, Any]) -> set[str]:
    """Long names of every file and directory in a FAT partition (recursive)."""
    out = sh("mdir", "-/", "-b", "-i", f"{img}@@{part['start'] * S}", "::/").stdout
    return {line.removeprefix("::/").rstrip("/") for line in out.splitlines() if line.strip()}


def mtype(img: Path, part: dict[str, Any], path: str) -> bytes:
    return subprocess.run(
        ["mtype", "-i", f"{img}@@{part['start'] * S}", f"::/{path}"],
        capture_output=True,
        check=True,
        env=ENV,
    ).stdout


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def nonzero_blocks(
    path: Path,
    start: int = 0,
    end: int | None = None,
) -> Iterator[tuple[int, bytes]]:
    """(offset, 64 KiB block) for every block of [start, end) that is not all zeros,
    reading only the data regions of a sparse file (SEEK_DATA)."""
    block = 64 * 1024
    with open(path, "rb") as f:
        fd = f.fileno()
        end = os.fstat(fd).st_size if end is None else end
        pos = start
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                return
            if data >= end:
                return
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            pos = max(start, data - data % block)
            f.seek(pos)
            while pos < hole:
                chunk = f.read(min(block, end - pos))
                if chunk.count(0) != len(chunk):
                    yield pos, chunk
                pos += len(chunk)


def content_digest(path: Path) -> str:
    """Equal digests mean byte-identical files (same size, same non-zero blocks)."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    for offset, chunk in nonzero_blocks(path):
        h.update(offset.to_bytes(8, "little"))
        h.update(chunk)
    return h.hexdigest()


def is_zero(img: Path, part: dict[str, Any]) -> bool:
    start = part["start"] * S
    return next(nonzero_blocks(img, start, start + part["size"] * S), None) is None


def debugfs_sha256(fs: Path, path: str) -> str:
    h = hashlib.sha256()
    with subprocess.Popen(
        ["debugfs", "-R", f"cat {path}", str(fs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=ENV,
    ) as proc:
        stdout = proc.stdout
        assert stdout is not None
        for chunk in iter(lambda: stdout.read(4 * MiB), b""):
            h.update(chunk)
    assert proc.returncode == 0
    return h.hexdigest()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def resinos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = tmp_path_factory.mktemp("resinos") / "resinos.img"
    build_resinos_image(img)
    return img


@pytest.fixture(scope="module")
def flasher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = tmp_path_factory.mktemp("flasher") / "flasher.img"
    build_flasher_image(img)
    return img


@pytest.fixture(scope="module")
def flasher_rootA(flasher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return extract(flasher, parts(flasher)[2], tmp_path_factory.mktemp("rootA") / "rootA.ext4")


@pytest.fixture(scope="module")
def newer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = tmp_path_factory.mktemp("newer") / "flasher.img"
    spec = FlasherSpec(
        inner_name=BALENA_NAME, kernel_name="bzImage", newer_grub_cfg=True, with_zstd=False
    )
    build_flasher_image(img, spec)
    return img


# ----------------------------------------------------------------------------- resinOS image


def test_resinos_table(resinos: Path) -> None:
    t = table(resinos)
    assert t["label"] == "dos" and t["unit"] == "sectors"
    p = parts(resinos)
    assert sorted(p) == [1, 2, 3, 4, 5, 6]
    p1 = (p[1]["start"], p[1]["size"], p[1]["type"], p[1].get("bootable"))
    assert p1 == (8192, 81920, "e", True)
    for n in (2, 3, 5, 6):
        assert p[n]["type"] == "83" and not p[n].get("bootable")
    assert p[2]["size"] == p[3]["size"] == 48 * MiB // S
    assert p[5]["size"] == 20 * MiB // S
    assert p[6]["size"] == 64 * MiB // S
    assert p[4]["type"] == "f"
    for n in (1, 2, 3, 4, 5, 6):
        assert p[n]["start"] % ALIGN_S == 0
    assert p[2]["start"] == p[1]["start"] + p[1]["size"]
    assert p[3]["start"] == p[2]["start"] + p[2]["size"]
    assert p[4]["start"] == p[3]["start"] + p[3]["size"]
    assert p[5]["start"] == p[4]["start"] + ALIGN_S  # EBR gap
    assert p[6]["start"] == p[5]["start"] + p[5]["size"] + ALIGN_S
    assert p[4]["start"] + p[4]["size"] == p[6]["start"] + p[6]["size"]
    assert resinos.stat().st_size == (p[6]["start"] + p[6]["size"]) * S
    assert resinos.stat().st_blocks * 512 < resinos.stat().st_size // 4  # sparse


def test_resinos_boot_code(resinos: Path) -> None:
    with open(resinos, "rb") as f:
        mbr = f.read(S)
        core = f.read(1 * MiB - S)
        rest = f.read(3 * MiB)
    assert mbr[510:] == b"\x55\xaa"
    assert mbr[:440].count(0) < 20  # pseudo-random boot code kept next to the table
    assert core.count(0) < len(core) // 100  # core.img stand-in
    assert rest.count(0) == len(rest)  # the rest of the first 4 MiB is empty


def test_resinos_filesystems(resinos: Path, tmp_path: Path) -> None:
    p = parts(resinos)
    boot = probe(resinos, p[1])
    assert (boot["TYPE"], boot["VERSION"], boot["LABEL"]) == ("vfat", "FAT16", "resin-boot")
    assert "TYPE" not in probe(resinos, p[4])  # the extended partition: an EBR only
    for n, label in ((2, "resin-rootA"), (3, "resin-rootB"), (5, "resin-state"), (6, "resin-data")):
        info = probe(resinos, p[n])
        assert (info["TYPE"], info["LABEL"]) == ("ext4", label)
        fs = extract(resinos, p[n], tmp_path / f"p{n}")
        sh("e2fsck", "-fn", fs)
        assert "User:     0   Group:     0" in debugfs(fs, "stat /")


def test_resinos_boot_files(resinos: Path) -> None:
    p1 = parts(resinos)[1]
    assert {"config.json", "grub.cfg", "EFI/BOOT/grub.cfg", "bzImage"} <= mdir_files(resinos, p1)
    config = json.loads(mtype(resinos, p1, "config.json"))
    assert config["deviceType"] == "intel-nuc"
    assert b"root=LABEL=resin-rootA" in mtype(resinos, p1, "grub.cfg")
    assert len(mtype(resinos, p1, "bzImage")) == 1 * MiB


def test_resinos_rootA_contents(resinos: Path, tmp_path: Path) -> None:
    fs = extract(resinos, parts(resinos)[2], tmp_path / "rootA")
    for d in ("/usr/bin", "/usr/lib", "/etc"):
        assert "Type: directory" in debugfs(fs, f"stat {d}")
    header = sh("dumpe2fs", "-h", fs).stdout
    fields = dict(line.split(":", 1) for line in header.splitlines() if ":" in line)
    used = int(fields["Block count"]) - int(fields["Free blocks"])
    assert 10 * MiB < used * int(fields["Block size"]) < 30 * MiB
    binary = tmp_path / "balena"
    text = tmp_path / "hwdb"
    debugfs(fs, f"dump /usr/bin/balena {binary}")
    debugfs(fs, f"dump /usr/lib/udev/hwdb.txt {text}")
    assert len(zlib.compress(binary.read_bytes(), 1)) > 0.99 * binary.stat().st_size
    assert len(zlib.compress(text.read_bytes(), 1)) < 0.6 * text.stat().st_size
    assert 'ID="resin-os"' in debugfs(fs, "cat /etc/os-release")


# ----------------------------------------------------------------------------- flasher image


def test_flasher_table(flasher: Path) -> None:
    """Same shape as REFERENCE.md's `parted unit s print` of a real flasher."""
    assert table(flasher)["label"] == "dos"
    p = parts(flasher)
    assert sorted(p) == [1, 2, 3, 4, 5, 6]
    p1 = (p[1]["start"], p[1]["size"], p[1]["type"], p[1].get("bootable"))
    assert p1 == (8192, 81920, "e", True)
    assert (p[2]["start"], p[2]["type"]) == (90112, "83")
    assert p[2]["size"] % ALIGN_S == 0
    assert (p[3]["start"], p[3]["size"], p[3]["type"]) == (p[2]["start"] + p[2]["size"], 8192, "83")
    assert (p[4]["start"], p[4]["size"], p[4]["type"]) == (p[3]["start"] + 8192, 40960, "f")
    assert (p[5]["start"], p[5]["size"], p[5]["type"]) == (p[4]["start"] + 8192, 8192, "83")
    assert (p[6]["start"], p[6]["size"], p[6]["type"]) == (p[5]["start"] + 16384, 16384, "83")
    for n in (2, 3, 4, 5, 6):
        assert not p[n].get("bootable")
    assert flasher.stat().st_size == (p[6]["start"] + p[6]["size"]) * S
    # sized like an unmodified flasher: the raw inner image plus ~40 % free
    inner = 232 * MiB
    assert p[2]["size"] * S >= 1.4 * inner
    assert p[2]["size"] * S <= 1.4 * inner + 64 * MiB
    assert flasher.stat().st_blocks * 512 < 64 * MiB  # sparse


def test_flasher_filesystems(flasher: Path) -> None:
    p = parts(flasher)
    boot = probe(flasher, p[1])
    assert (boot["TYPE"], boot["VERSION"], boot["LABEL"]) == ("vfat", "FAT16", "flash-boot")
    assert (probe(flasher, p[2])["TYPE"], probe(flasher, p[2])["LABEL"]) == ("ext4", "flash-rootA")
    assert (probe(flasher, p[3])["TYPE"], probe(flasher, p[3])["LABEL"]) == ("ext4", "flash-rootB")
    for n in (5, 6):  # flash-state, flash-data: unformatted
        assert probe(flasher, p[n]) == {}
        assert is_zero(flasher, p[n])


def test_flasher_boot_files(flasher: Path) -> None:
    p1 = parts(flasher)[1]
    files = mdir_files(flasher, p1)
    assert {
        "config.json",
        "resin-image-flasher",
        "vmlinuz",
        "grub.cfg",
        "EFI/BOOT/grub.cfg",
        "splash/resin-logo.png",
    } <= files
    assert json.loads(mtype(flasher, p1, "config.json")) == {
        "deviceType": "intel-nuc",
        "applicationName": "synthetic",
    }
    assert mtype(flasher, p1, "resin-image-flasher") == b""
    assert len(mtype(flasher, p1, "vmlinuz")) == 2 * MiB
    assert mtype(flasher, p1, "splash/resin-logo.png").startswith(b"\x89PNG\r\n\x1a\n")
    for cfg in ("grub.cfg", "EFI/BOOT/grub.cfg"):
        assert b"linux /vmlinuz root=LABEL=flash-rootA rootwait\n" in mtype(flasher, p1, cfg)


def test_flasher_rootA(flasher_rootA: Path, resinos: Path) -> None:
    fs = flasher_rootA
    sh("e2fsck", "-fn", fs)
    st = stat_fields(fs, f"/opt/{INNER_NAME}")
    assert (st["User"], st["Group"]) == ("0", "0")
    assert int(st["Size"]) == resinos.stat().st_size
    init = stat_fields(fs, "/usr/bin/resin-init-flasher")
    assert (init["User"], init["Group"], init["Mode"]) == ("0", "0", "0755")
    assert debugfs(fs, "cat /usr/bin/resin-init-flasher").startswith("#!/bin/bash\n")
    conf = debugfs(fs, "cat /etc/resin-init-flasher.conf").splitlines()
    assert 'INTERNAL_DEVICE_KERNEL="nvme0n1 sda sdb mmcblk0 mmcblk1"' in conf
    assert "INTERNAL_DEVICE_BOOTLOADER_CONFIG=grub.cfg_internal" in conf
    assert "INTERNAL_DEVICE_BOOTLOADER_CONFIG_PATH=/EFI/BOOT/grub.cfg" in conf
    assert f"RESIN_IMAGE={INNER_NAME}" in conf
    osr = debugfs(fs, "cat /etc/os-release")
    assert 'ID="resin-os"' in osr and 'VERSION_ID="2.' in osr
    assert stat_fields(fs, "/bin/sh")["Mode"] == "0755"
    zstd = stat_fields(fs, "/usr/bin/zstd")
    assert (zstd["User"], zstd["Mode"]) == ("0", "0755")
    assert int(zstd["Size"]) == Path(shutil.which("zstd") or "/usr/bin/zstd").stat().st_size
    # every inode is root-owned, whoever built the image
    listing = debugfs(fs, "ls -p /") + debugfs(fs, "ls -p /usr/bin") + debugfs(fs, "ls -p /opt")
    for entry in filter(None, listing.splitlines()):
        _, _ino, _mode, uid, gid, *_ = entry.split("/")
        assert (uid, gid) == ("0", "0"), entry


def test_inner_image_matches_resinos(flasher_rootA: Path, resinos: Path) -> None:
    assert debugfs_sha256(flasher_rootA, f"/opt/{INNER_NAME}") == sha256(resinos)


def test_inner_image_is_sparse_in_rootA(flasher_rootA: Path) -> None:
    out = debugfs(flasher_rootA, f"stat /opt/{INNER_NAME}")
    blockcount = int(out.split("Blockcount:")[1].split()[0])  # 512-byte units
    assert blockcount * 512 < 32 * MiB  # holes kept by mkfs.ext4 -d


def test_builds_are_byte_identical(flasher: Path, resinos: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.img"
    build_flasher_image(again)
    assert content_digest(again) == content_digest(flasher)
    build_resinos_image(again)
    assert content_digest(again) == content_digest(resinos)
    build_resinos_image(again, seed=2)
    assert content_digest(again) != content_digest(resinos)


def test_content_digest_tells_files_apart(tmp_path: Path) -> None:
    """content_digest (reads data regions only) sees holes, written zeros and data alike."""
    a, b = tmp_path / "a", tmp_path / "b"
    with open(a, "wb") as f:
        f.seek(3 * MiB)
        f.write(b"x")
        f.truncate(8 * MiB)
    with open(b, "wb") as f:
        f.write(bytes(3 * MiB) + b"x")  # same bytes, no holes
        f.truncate(8 * MiB)
    assert content_digest(a) == content_digest(b)
    with open(b, "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"y")
    assert content_digest(a) != content_digest(b)
    b.write_bytes(b"x")
    assert content_digest(a) != content_digest(b)


def test_newer_flasher(newer: Path, tmp_path: Path) -> None:
    p = parts(newer)
    files = mdir_files(newer, p[1])
    assert "boot/bzImage" in files and "vmlinuz" not in files
    cfg = mtype(newer, p[1], "grub.cfg").decode()
    assert "search --no-floppy --set=root --label flash-rootA" in cfg
    assert "linux /boot/bzImage root=LABEL=flash-rootA flasher\n" in cfg
    fs = extract(newer, p[2], tmp_path / "rootA")
    sh("e2fsck", "-fn", fs)
    assert int(stat_fields(fs, f"/opt/{BALENA_NAME}")["Size"]) > 0
    assert "File not found" in sh("debugfs", "-R", "stat /usr/bin/zstd", fs).stderr
    assert f"RESIN_IMAGE={BALENA_NAME}" in debugfs(fs, "cat /etc/resin-init-flasher.conf")
    assert int(stat_fields(fs, "/boot/bzImage")["Size"]) == 2 * MiB


def test_flasher_without_rootA(tmp_path: Path) -> None:
    img = tmp_path / "norootA.img"
    build_flasher_image(img, FlasherSpec(with_rootA=False))
    p = parts(img)
    assert p[2]["size"] % ALIGN_S == 0 and p[2]["size"] > 0
    assert probe(img, p[2]) == {}
    assert is_zero(img, p[2])
    assert probe(img, p[1])["LABEL"] == "flash-boot"


def test_flasher_without_inner_image(tmp_path: Path) -> None:
    img = tmp_path / "noinner.img"
    build_flasher_image(img, FlasherSpec(with_inner_image=False))
    fs = extract(img, parts(img)[2], tmp_path / "rootA")
    sh("e2fsck", "-fn", fs)
    entries = [e for e in debugfs(fs, "ls -p /opt").splitlines() if e]
    assert [e.split("/")[5] for e in entries] == [".", ".."]
    assert "RESIN_IMAGE=" in debugfs(fs, "cat /etc/resin-init-flasher.conf")


def test_cached_flasher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESIN_MIGRATE_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache" / "synthetic"
    spec = FlasherSpec(with_inner_image=False)
    first = cached_flasher(spec)
    assert first.parent == cache_dir() and first.exists()
    assert first.stat().st_mode & 0o777 == 0o644
    mtime = first.stat().st_mtime_ns
    assert cached_flasher(spec) == first
    assert first.stat().st_mtime_ns == mtime  # not rebuilt
    assert cached_flasher(FlasherSpec(with_inner_image=False, seed=2)) != first
    assert [p.name for p in cache_dir().iterdir() if p.name.startswith(".")] == []


def test_command_error_names_the_command(tmp_path: Path) -> None:
    from tests.synthetic import _run

    with pytest.raises(CommandError) as info:
        _run(["e2fsck", "-fn", tmp_path / "missing.img"])
    assert info.value.returncode != 0
    assert "e2fsck -fn" in str(info.value) and "missing.img" in str(info.value)


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("runuser"),
    reason="needs root to run the build as an unprivileged user",
)
def test_unprivileged_build_is_identical(flasher: Path) -> None:
    """mkfs.ext4 -d copies the builder's uid/gid: the build fixes ownership afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.chmod(work, 0o777)
        script = work / "synthetic.py"
        shutil.copy(Path(__file__).with_name("synthetic.py"), script)
        out = work / "user.img"
        sh(
            "runuser",
            "-u",
            "nobody",
            "--",
            "env",
            "-i",
            "PATH=/usr/bin:/bin",
            "HOME=/nonexistent",
            "python3",
            script,
            out,
        )
        assert content_digest(out) == content_digest(flasher)
