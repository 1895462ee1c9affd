"""The synthetic flashers of the release matrix checked, with independent tools, against the
shape of the real release each row stands for (REFERENCE.md, and the sources
``tests.releases`` cites).

Nothing here reads the images through the builders' own helpers: partition tables come
from ``sfdisk --json``, signatures from ``blkid -p``, FAT files from mtools
(``IMAGE@@OFFSET``), ext4 from e2fsprogs on ``IMAGE?offset=N``, unit enablement from
``systemctl --root`` on a tree that ``debugfs rdump`` wrote. The expected facts are written
out below from REFERENCE.md's release boundaries (``reference_facts``), not taken from the
functions that generate the images' text, so that a generator drifting away from the real
images fails here. No root needed (except the unprivileged-build test, which needs root to
become another user).
"""

from __future__ import annotations

import dataclasses
import filecmp
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from tests import imaging
from tests.imaging import Part
from tests.releases import DEFAULT, RELEASES
from tests.synthetic import (
    CommandError,
    FlasherSpec,
    build_flasher_image,
    build_resinos_image,
    cache_dir,
    cached_flasher,
    cached_resinos,
)
from tests.tools import sfdisk_json, sfdisk_partitions

MiB = 1 << 20
S = 512  # sector
ALIGN_S = 4 * MiB // S  # the real images' partition alignment, in sectors
ENV = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin", "LC_ALL": "C"}
ROWS = list(RELEASES)

#: Both flag files hold this (meta-balena classes/image-balena.bbclass).
FLAG_TEXT = b"DO NOT REMOVE THIS FILE\n"
#: OS_KERNEL_CMDLINE of a production image from meta-balena v2.108.4 (82df437d8).
CONSOLE_NULL = "console=null quiet splash vt.global_cursor_default=0 consoleblank=0"
#: The types sfdisk reports for a GPT table's EFI system and Linux filesystem partitions.
GPT_ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
GPT_LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


# ----------------------------------------------------------------------------- facts


#: The release each row stands for (os-release VERSION_ID): a balena-intel tag where the
#: row's boundary is a board revision, else a meta-balena one.
ROW_RELEASE = {"2.12": "2.12.7+rev2", "2.51": "2.51.1+rev5", "2.95": "2.95.15",
               "2.108": "2.108.27", "2.113": "2.113.34", "5.1": "5.1.45", "6.10": "6.10.24",
               "6.10-ext": "6.10.24", "8.0-ext": "8.0.2"}


def _version(text: str) -> tuple[int, ...]:
    """"2.51.1+rev5" -> (2, 51, 1, 5); "2.95.15" -> (2, 95, 15, 0)."""
    numbers, _, rev = text.partition("+rev")
    return (*(int(n) for n in numbers.split(".")), int(rev or 0))


@dataclasses.dataclass(frozen=True)
class Facts:
    """What REFERENCE.md says a real flasher of one release row has."""

    row: str
    release: str  # os-release VERSION_ID
    version: tuple[int, ...]  # the row's release, e.g. (2, 51, 1, 5)
    machine: str
    slug: str
    flag: str  # flag file at the root of flash-boot
    inner: str  # the raw image in flash-rootA's /opt
    image_key: str  # the key naming it in /etc/resin-init-flasher.conf
    kernel_on_boot: bool  # /vmlinuz on flash-boot, else /boot/bzImage in flash-rootA
    grubenv: bool
    extraenv: str | None  # the `source` line's file
    console_null: bool
    firmware_class_path: bool
    ro_mount: bool  # mnt-boot.mount ro from flash-boot (else mnt-bootorig + bind mounts)
    after_register: bool  # resin-init-flasher.service After=resin-device-register.service
    wants_openvpn: bool
    zstd: bool
    system_proxy: bool  # the system-proxy/ samples on flash-boot
    luks_cfg: bool  # grub.cfg_internal_luks on flash-boot, signed or not
    grub_timeout: int
    image_boots_bios: bool  # the inner image's own MBR code, core.img, /grub/grub.cfg
    boot_mib: int
    state_mib: int
    root_mib: int
    data_mib: int


def reference_facts(row: str) -> Facts:
    """The facts of a row from REFERENCE.md's boundaries ("6.10-ext": release 6.10 of
    genericx86-64-ext). balena-intel and meta-balena share version numbers from 2.x on."""
    v = _version(ROW_RELEASE[row])
    ext = row.endswith("-ext")
    machine = "genericx86-64-ext" if ext else "genericx86-64"
    balena = v >= (2, 72)  # meta-balena v2.72.0 (057621ad6): resin -> balena names
    if v < (2, 51, 1, 5):  # balena-intel v2.51.1+rev5 (315071b)
        extraenv = None
    elif v < (3, 1, 2):
        extraenv = "/grub/grub_extraenv"
    else:
        extraenv = "${prefix}/grub_extraenv"
    return Facts(
        row=row,
        release=ROW_RELEASE[row],
        version=v,
        machine=machine,
        slug="genericx86-64-ext" if ext else "intel-nuc",
        flag="balena-image-flasher" if balena else "resin-image-flasher",
        inner=(f"balena-image-{machine}.balenaos-img" if balena
               else f"resin-image-{machine}.resinos-img"),
        image_key="BALENA_IMAGE" if balena else "RESIN_IMAGE",
        kernel_on_boot=v < (2, 21, 0, 1),  # balena-intel v2.21.0+rev1 (d453617)
        grubenv=v >= (2, 21, 0, 1),
        extraenv=extraenv,
        console_null=v >= (2, 108, 4),  # meta-balena 82df437d8
        firmware_class_path=v >= (6, 8, 5),  # meta-balena 410acd1ed
        ro_mount=v >= (2, 50),
        after_register=(2, 91, 6) <= v < (3, 1, 6),  # 314047e72 .. 0b246409d
        wants_openvpn=v >= (5,),
        zstd=v >= (6, 5, 40),  # os-helpers-fs needs it (91c07c0f2)
        system_proxy=v >= (2, 108, 30),  # meta-balena 5b446ea58
        luks_cfg=v >= (2, 87, 26, 1),  # balena-intel 54726df
        grub_timeout=3 if v < (2, 95) else 0,  # bi grub.cfg_external; mb template, prod
        image_boots_bios=v >= (2, 21, 0, 1),  # balena-intel e7a8136
        boot_mib=100 if v >= (8,) else 40,  # meta-balena v8.0.0 (1712a927f)
        state_mib=80 if v >= (8,) else 20,  # same commit
        root_mib=1000 if ext else 320,  # balena-intel balena-image.bbappend (-ext)
        data_mib=1024 if v < (2, 39) else 192,  # docker-disk.bb
    )


# ----------------------------------------------------------------------------- commands


def sh(*argv: object, ok: tuple[int, ...] = (0,), cwd: Path | None = None
       ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=ENV,
                          cwd=cwd, errors="replace")
    assert proc.returncode in ok, f"{argv}: exit {proc.returncode}: {proc.stderr}"
    return proc


def sh_bytes(*argv: object) -> bytes:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, env=ENV)
    assert proc.returncode == 0, f"{argv}: exit {proc.returncode}: {proc.stderr!r}"
    return proc.stdout


# ----------------------------------------------------------------------------- tables


def probe(img: Path, part: Part) -> dict[str, str]:
    """blkid's low-level probe of one partition; {} when it finds nothing (exit code 2)."""
    proc = sh("blkid", "-p", "-o", "export", "-O", part.offset, "-S", part.size * S, img,
              ok=(0, 2))
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def check_msdos_layout(img: Path, primaries: list[int | None], logicals: list[int]
                       ) -> dict[int, Part]:
    """The layout of image_types_balena.bbclass: msdos, the first 4 MiB reserved, p1 (FAT16
    LBA, boot flag) p2 p3 of the given sizes (MiB, None: any 4 MiB multiple) back to back,
    p4 extended (LBA) to the end of the disk, each logical partition 4 MiB after the
    previous end (room for its EBR), the file ending with the last partition."""
    table = sfdisk_json(img)
    assert (table["label"], table["unit"], table["sectorsize"]) == ("dos", "sectors", 512)
    p = sfdisk_partitions(img)
    assert sorted(p) == [1, 2, 3, 4, 5, 6]
    assert [n for n in p if p[n].bootable] == [1]
    assert [p[n].type for n in sorted(p)] == ["e", "83", "83", "f", "83", "83"]
    for part in p.values():
        assert part.start % ALIGN_S == 0 and part.size % ALIGN_S == 0, part
    assert p[1].start == ALIGN_S
    assert p[2].start == p[1].end and p[3].start == p[2].end and p[4].start == p[3].end
    assert p[5].start == p[4].start + ALIGN_S
    assert p[6].start == p[5].end + ALIGN_S
    assert p[4].end == p[6].end
    assert img.stat().st_size == p[6].end * S
    for n, mib in zip((1, 2, 3, 5, 6), [*primaries, *logicals]):
        if mib is not None:
            assert p[n].size * S == mib * MiB, (n, p[n].size * S // MiB, mib)
    return p


def check_grub_boot_code(img: Path, present: bool) -> None:
    """GRUB's boot.img in the MBR's code area (it holds the string "GRUB ") and core.img
    from sector 1 (its first sector, diskboot, prints "loading"); or neither."""
    mbr = read_at(img, 0, S)
    assert mbr[510:] == b"\x55\xaa"
    sector1 = read_at(img, S, S)
    if present:
        assert b"GRUB " in mbr[:440]
        assert b"loading" in sector1
    else:
        assert b"GRUB" not in mbr[:440]
        assert sector1.count(0) == S  # no core.img either


# ----------------------------------------------------------------------------- FAT


def fat(img: Path, part: Part) -> str:
    """The mtools drive spec of a FAT partition inside an image."""
    return f"{img}@@{part.offset}"


def fat_files(img: Path, part: Part) -> set[str]:
    """Every file and directory of a FAT partition, relative, directories without '/'."""
    out = sh("mdir", "-/", "-b", "-i", fat(img, part), "::/").stdout
    return {line.removeprefix("::/").rstrip("/") for line in out.splitlines() if line.strip()}


def fat_read(img: Path, part: Part, path: str) -> bytes:
    return sh_bytes("mtype", "-i", fat(img, part), f"::/{path}")


def fat_copy(img: Path, part: Part, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    sh("mcopy", "-s", "-n", "-m", "-i", fat(img, part), "::/*", dest)
    return dest


# ----------------------------------------------------------------------------- ext4


def ext4(img: Path, part: Part) -> str:
    """The e2fsprogs spec of an ext4 partition inside an image."""
    return f"{img}?offset={part.offset}"


def debugfs(fs: str, request: str) -> str:
    """debugfs -R; it exits 0 when the request fails, so any stderr line but its banner
    fails the test."""
    proc = sh("debugfs", "-R", request, fs)
    errors = [line for line in proc.stderr.splitlines()
              if line.strip() and not line.startswith("debugfs ")]
    assert not errors, f"debugfs -R {request!r} {fs}: {errors}"
    return proc.stdout


def ext4_exists(fs: str, path: str) -> bool:
    proc = sh("debugfs", "-R", f"stat {path}", fs)
    return "Inode:" in proc.stdout


def ext4_stat(fs: str, path: str) -> dict[str, str]:
    """The "Key: value" fields of debugfs stat, first occurrence kept ("Fragment: ...
    Size: 0" comes after the file's Size)."""
    fields: dict[str, str] = {}
    for key, value in re.findall(r"(\w+):\s+(\S+)", debugfs(fs, f"stat {path}")):
        fields.setdefault(key, value)
    return fields


def ext4_ls(fs: str, path: str) -> dict[str, tuple[str, int]]:
    """name -> (octal mode, size) of a directory's entries, . and .. left out."""
    out = {}
    for line in debugfs(fs, f"ls -p {path}").splitlines():
        if line.strip():
            _, _ino, mode, _uid, _gid, name, size, _ = line.split("/")
            if name not in (".", ".."):
                out[name] = (mode, int(size or 0))
    return out


def ext4_header(fs: str) -> dict[str, str]:
    out = sh("dumpe2fs", "-h", fs).stdout
    return {k.strip(): v.strip() for k, v in
            (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def ext4_extract_sparse(fs: str, path: str, out: Path) -> Path:
    """The file path of fs copied to out through debugfs's own map of it (dump_extents -l),
    holes left as holes: `debugfs dump` writes every hole as zeros (2.3 GB for an -ext
    image). fs is "IMAGE?offset=N"."""
    size = int(ext4_stat(fs, path)["Size"])
    block = int(ext4_header(fs)["Block size"])
    image, _, offset = fs.partition("?offset=")
    base = int(offset or 0)
    leaf = re.compile(r"^\s*\d+/\s*\d+\s+\d+/\s*\d+\s+(\d+)\s*-\s*(\d+)\s+(\d+)\s*-\s*(\d+)"
                      r"\s+(\d+)\s*(.*)$")
    extents = [leaf.match(line) for line in debugfs(fs, f"dump_extents -l {path}").splitlines()]
    with open(image, "rb") as src, open(out, "wb") as dst:
        dst.truncate(size)
        for match in filter(None, extents):
            logical, _, physical, _, length, flags = match.groups()
            if "Uninit" in flags:  # allocated but reads as zeros
                continue
            for i in range(0, int(length), 1024):
                count = min(1024, int(length) - i)
                src.seek(base + (int(physical) + i) * block)
                data = src.read(count * block)
                pos = (int(logical) + i) * block
                dst.seek(pos)
                dst.write(data[: max(0, size - pos)])
    return out


def rdump_tree(fs: str, dest: Path, skip: tuple[str, ...] = ("opt", "lost+found")) -> Path:
    """The filesystem's tree written by debugfs rdump (symlinks kept as symlinks), every
    top-level entry but skip: /opt holds the raw inner image, which rdump would write out
    in full. rdump's chown fails without root: its stderr is not checked, its result is."""
    dest.mkdir(parents=True, exist_ok=True)
    names = [name for name in ext4_ls(fs, "/") if name not in skip]
    sh("debugfs", "-R", "rdump " + " ".join(f"/{n}" for n in names) + f" {dest}", fs)
    assert sorted(os.listdir(dest)) == sorted(names)
    return dest


# ----------------------------------------------------------------------------- systemd


def unit_directives(text: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values of a unit file, repeated keys appended in order."""
    out: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {raw!r}"
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


def words(directives: dict[tuple[str, str], list[str]], section: str, key: str) -> list[str]:
    """The space-separated words of every value of a list directive (Requires=, After=)."""
    return [w for value in directives.get((section, key), []) for w in value.split()]


def is_enabled(tree: Path, unit: str) -> tuple[int, str]:
    proc = sh("systemctl", f"--root={tree}", "is-enabled", unit, ok=(0, 1))
    return proc.returncode, proc.stdout.strip()


# ----------------------------------------------------------------------------- files


def nonzero_blocks(path: Path, start: int = 0, end: int | None = None
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
            # a hole and the next data inside one block: that block was read already
            pos = max(pos, start, data - data % block)
            f.seek(pos)
            while pos < hole:
                chunk = f.read(min(block, end - pos))
                if chunk.count(0) != len(chunk):
                    yield pos, chunk
                pos += len(chunk)


def _digest(size: int, blocks: Iterable[tuple[int, bytes]]) -> str:
    h = hashlib.sha256(str(size).encode())
    for offset, chunk in blocks:
        h.update(offset.to_bytes(8, "little"))
        h.update(chunk)
    return h.hexdigest()


def content_digest(path: Path) -> str:
    """Equal digests mean byte-identical files (same size, same non-zero blocks)."""
    return _digest(path.stat().st_size, nonzero_blocks(path))


def stream_digest(argv: list[str], size: int) -> str:
    """content_digest of what a command writes to stdout (size bytes, checked)."""
    block = 64 * 1024

    def blocks() -> Iterator[tuple[int, bytes]]:
        pos = 0
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              env=ENV) as proc:
            assert proc.stdout is not None
            while chunk := proc.stdout.read(block):
                if chunk.count(0) != len(chunk):
                    yield pos, chunk
                pos += len(chunk)
        assert (proc.returncode, pos) == (0, size), argv

    return _digest(size, blocks())


def is_zero(img: Path, part: Part) -> bool:
    return next(nonzero_blocks(img, part.offset, part.end * S), None) is None


def tree_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def key_values(text: str) -> dict[str, str]:
    """KEY=value and KEY="value" lines (os-release, resin-init-flasher.conf)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            out[key.strip()] = value.strip().strip('"')
    return out


# ----------------------------------------------------------------------------- fixtures


@dataclasses.dataclass(frozen=True)
class Flasher:
    facts: Facts
    path: Path
    parts: dict[int, Part]

    @property
    def boot(self) -> Part:
        return self.parts[1]

    @property
    def rootfs(self) -> str:
        return ext4(self.path, self.parts[2])


@pytest.fixture(scope="module", params=ROWS)
def flasher(request: pytest.FixtureRequest) -> Flasher:
    """The cached synthetic flasher of one release row (built once, reused across runs)."""
    row: str = request.param
    path = cached_flasher(FlasherSpec(release=RELEASES[row]))
    return Flasher(reference_facts(row), path, sfdisk_partitions(path))


@pytest.fixture(scope="module")
def rootfs_tree(flasher: Flasher, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """flash-rootA as debugfs rdump writes it, for systemctl --root and plain reads."""
    return rdump_tree(flasher.rootfs, tmp_path_factory.mktemp(f"rootA-{flasher.facts.row}"))


@pytest.fixture(scope="module")
def inner_image(flasher: Flasher, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The raw image in flash-rootA's /opt, extracted (sparse) with debugfs's block map."""
    out = tmp_path_factory.mktemp(f"inner-{flasher.facts.row}") / flasher.facts.inner
    return ext4_extract_sparse(flasher.rootfs, f"/opt/{flasher.facts.inner}", out)


# ----------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("row", ROWS)
def test_release_row_matches_reference(row: str) -> None:
    """The release table says what REFERENCE.md says of each row."""
    f, r = reference_facts(row), RELEASES[row]
    assert (r.name, r.version) == (row, f.release)
    assert (r.machine, r.slug, r.flag_file, r.inner_name) == (f.machine, f.slug, f.flag,
                                                              f.inner)
    assert r.kernel_path == ("/vmlinuz" if f.kernel_on_boot else "/boot/bzImage")
    assert (r.grubenv, r.extraenv, bool(r.os_cmdline), r.firmware_class_path) == \
        (f.grubenv, f.extraenv, f.console_null, f.firmware_class_path)
    assert (r.mounts == "ro", r.registration_ordering, r.openvpn_wants, r.zstd) == \
        (f.ro_mount, f.after_register, f.wants_openvpn, f.zstd)
    assert (r.image_boots_bios, r.boot_mib, r.state_mib, r.root_mib, r.data_mib) == \
        (f.image_boots_bios, f.boot_mib, f.state_mib, f.root_mib, f.data_mib)


def test_flasher_table(flasher: Flasher) -> None:
    """msdos, 4 MiB aligned, flash-boot FAT16 with the boot flag, the small flash-rootB,
    and unformatted flash-state and flash-data; GRUB's code in the flasher's own MBR."""
    f = flasher.facts
    # flash-state is one BALENA_IMAGE_ALIGNMENT (4 MiB); flash-data, created "to 100 %" of
    # a raw image whose size counts one alignment more than the partitions use, gets 8 MiB
    # (image_types_balena.bbclass; the layout file's parted print of a real flasher).
    p = check_msdos_layout(flasher.path, [f.boot_mib, None, 4], [4, 8])
    img = flasher.path
    boot = probe(img, p[1])
    assert (boot["TYPE"], boot["VERSION"], boot["LABEL"]) == ("vfat", "FAT16", "flash-boot")
    for n, label in ((2, "flash-rootA"), (3, "flash-rootB")):
        info = probe(img, p[n])
        assert (info["TYPE"], info["LABEL"]) == ("ext4", label)
    assert "TYPE" not in probe(img, p[4])  # the extended partition: an EBR only
    for n in (5, 6):  # flash-state, flash-data: no filesystem, nothing written
        assert probe(img, p[n]) == {}
        assert is_zero(img, p[n])
    check_grub_boot_code(img, present=True)  # balena-intel write_mbr


def test_flash_boot_files(flasher: Flasher) -> None:
    """flash-boot's files of the release: GRUB's configs where core.img (prefix /grub) and
    the EFI loader look, the flag file, the environment blocks, the files the flasher
    copies onto the internal disk, and the kernel only before balena-intel v2.21."""
    f, img, p1 = flasher.facts, flasher.path, flasher.boot
    files = fat_files(img, p1)
    assert {"grub/grub.cfg", "EFI/BOOT/grub.cfg", "grub.cfg_internal", "device-type.json",
            "grub/boot.img", "grub/core.img", "grub/i386-pc"} <= files
    assert "grub.cfg" not in files  # never at the root
    cfg = fat_read(img, p1, "grub/grub.cfg")
    assert fat_read(img, p1, "EFI/BOOT/grub.cfg") == cfg

    other = "resin-image-flasher" if f.flag == "balena-image-flasher" else "balena-image-flasher"
    assert f.flag in files and other not in files
    assert fat_read(img, p1, f.flag) == FLAG_TEXT

    for d in ("grub", "EFI/BOOT"):
        assert (f"{d}/grub_extraenv" in files) == (f.extraenv is not None)
        assert (f"{d}/grubenv" in files) == f.grubenv
    if f.grubenv:
        env = fat_read(img, p1, "grub/grubenv")
        assert len(env) == 1024 and env.startswith(b"# GRUB Environment Block\n")

    assert json.loads(fat_read(img, p1, "device-type.json"))["slug"] == f.slug
    pngs = [name for name in files if name.startswith("splash/") and name.endswith(".png")]
    assert pngs and fat_read(img, p1, pngs[0]).startswith(b"\x89PNG\r\n\x1a\n")
    assert "system-connections/README.ignore" in files
    proxy = {"system-proxy/README.ignore", "system-proxy/redsocks.conf.ignore"}
    assert (proxy <= files) == f.system_proxy
    assert ("system-proxy" in files) == f.system_proxy
    assert ("grub.cfg_internal_luks" in files) == f.luks_cfg
    assert b"root=LABEL=resin-rootA" in fat_read(img, p1, "grub.cfg_internal")
    assert any(n.startswith("grub/i386-pc/") for n in files)
    assert fat_read(img, p1, "grub/boot.img")[510:512] == b"\x55\xaa"
    assert ("vmlinuz" in files) == f.kernel_on_boot
    assert not any(n == "balena-keys" or n.startswith("balena-keys/") for n in files)


def test_flasher_grub_entry(flasher: Flasher) -> None:
    """The flasher's GRUB entry of the release, as REFERENCE.md's table gives it."""
    f = flasher.facts
    text = fat_read(flasher.path, flasher.boot, "grub/grub.cfg").decode()
    lines = [line.strip() for line in text.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("menuentry")]
    assert len(starts) == 1 and lines[starts[0]].startswith("menuentry 'flash'")
    head = lines[: starts[0]]
    assert f"timeout={f.grub_timeout}" in head
    entry = lines[starts[0] + 1: lines.index("}", starts[0])]
    linux = [line for line in entry if line.startswith("linux ")]
    assert len(linux) == 1
    line = linux[0]
    # the initramfs is bundled into the kernel (INITRAMFS_IMAGE_BUNDLE = "1")
    assert not any(x.startswith("initrd") for x in lines)
    if f.extraenv is None:  # 2.12
        assert line == "linux /vmlinuz root=LABEL=flash-rootA rootwait"
        assert not any(x.startswith(("search", "source")) for x in lines)
        return
    assert "search --set=root --label flash-rootA" in entry
    args = line.split()
    assert args[:3] == ["linux", "/boot/bzImage", "root=LABEL=flash-rootA"]
    assert "flasher" in args and "rootwait" in args
    assert "insmod configfile" in head
    assert f"source {f.extraenv}" in head
    if f.firmware_class_path:
        assert line.endswith(" ${extra_os_cmdline} ${extra_os_firmware_class_path}")
    else:
        assert line.endswith(" ${extra_os_cmdline}")
        assert "${extra_os_firmware_class_path}" not in line
    assert (CONSOLE_NULL in line) == f.console_null
    assert ("console=null" in line) == f.console_null


def test_flasher_rootfs(flasher: Flasher, rootfs_tree: Path) -> None:
    """flash-rootA: a clean ext4 filling its partition with room to spare, the release's
    os-release and flasher config, the raw inner image stored sparse, the kernel from
    balena-intel v2.21 on, zstd from meta-balena v6.5.40 on, and the rootfs copy of
    flash-boot that the initramfs migrator reads."""
    f, fs, tree = flasher.facts, flasher.rootfs, rootfs_tree
    sh("e2fsck", "-fn", fs)
    header = ext4_header(fs)
    assert header["Filesystem volume name"] == "flash-rootA"
    block = int(header["Block size"])
    assert int(header["Block count"]) * block == flasher.parts[2].size * S

    osr = key_values((tree / "etc/os-release").read_text())
    assert osr["VERSION"] == f.release
    # VERSION_ID is the board's release from meta-balena v2.38.0 (40347f618), before it
    # meta-resin's version without the board's +revN
    assert osr["VERSION_ID"] == (f.release if f.version >= (2, 38) else
                                 f.release.split("+")[0])
    assert osr["MACHINE"] == f.machine
    conf = key_values((tree / "etc/resin-init-flasher.conf").read_text())
    assert conf[f.image_key] == f.inner
    assert ({"BALENA_IMAGE", "RESIN_IMAGE"} - {f.image_key}).isdisjoint(conf)

    opt = ext4_ls(fs, "/opt")
    assert list(opt) == [f.inner]  # no .sig: an unsigned build
    st = ext4_stat(fs, f"/opt/{f.inner}")
    size = int(st["Size"])
    assert st["Type"] == "regular" and size == opt[f.inner][1]
    assert int(st["Blockcount"]) * 512 < size // 4  # holes kept: stored sparse
    # "about 30 % free besides the raw image": room for offline edits
    assert flasher.parts[2].size * S >= 1.25 * size

    assert (tree / "boot/bzImage").is_file() == (not f.kernel_on_boot)
    zstd = tree / "usr/bin/zstd"
    assert zstd.is_file() == f.zstd
    if f.zstd:
        assert zstd.read_bytes()[:4] == b"\x7fELF" and os.access(zstd, os.X_OK)
    assert (tree / "usr/bin/resin-init-flasher").read_bytes().startswith(b"#!")

    assert (tree / "flash-boot" / f.flag).read_bytes() == FLAG_TEXT


def test_flasher_rootfs_copy_of_flash_boot(flasher: Flasher, rootfs_tree: Path,
                                            tmp_path: Path) -> None:
    """/flash-boot in the rootfs holds flash-boot's files (image-balena.bbclass copies
    the boot directory there), byte for byte."""
    boot = fat_copy(flasher.path, flasher.boot, tmp_path / "flash-boot")
    copy = rootfs_tree / "flash-boot"
    assert tree_files(copy) == tree_files(boot)
    for rel in sorted(tree_files(boot)):
        if (boot / rel).is_file():
            assert filecmp.cmp(boot / rel, copy / rel, shallow=False), rel


def test_flasher_units(flasher: Flasher, rootfs_tree: Path) -> None:
    """The flasher's units where Yocto installs them, each enabled by an absolute symlink
    in multi-user.target.wants (systemctl --root agrees), and the directives the release
    has: the read-only flash-boot mount from 2.50 (2.12: mnt-bootorig and bind mounts),
    the wait for registration from 2.91.6 to 3.1.5, openvpn from 5.x."""
    f, tree = flasher.facts, rootfs_tree
    etc, lib = tree / "etc/systemd/system", tree / "lib/systemd/system"
    if f.ro_mount:
        etc_units = {"mnt-boot.mount", "mnt-boottmp.mount", "temp-conf.service",
                     "resin-boot.service"}
    else:
        etc_units = {"mnt-bootorig.mount", "mnt-bootorig-config.json.mount", "mnt-boot.mount",
                     "temp-conf.service", "resin-boot.service"}
    lib_units = {"resin-init-flasher.service", "resin-device-register.service"}
    assert {p.name for p in etc.iterdir() if p.is_file() and not p.is_symlink()} == etc_units
    assert lib_units <= {p.name for p in lib.iterdir() if p.is_file()}

    wants = etc / "multi-user.target.wants"
    assert {p.name for p in wants.iterdir()} == etc_units | lib_units
    for name in sorted(etc_units | lib_units):
        home = "/etc/systemd/system" if name in etc_units else "/lib/systemd/system"
        assert os.readlink(wants / name) == f"{home}/{name}"  # absolute, as Yocto makes it
        assert is_enabled(tree, name) == (0, "enabled"), name

    def unit(name: str) -> dict[tuple[str, str], list[str]]:
        return unit_directives(((etc if name in etc_units else lib) / name).read_text())

    boot_mount = unit("mnt-boot.mount")
    assert boot_mount[("Mount", "Where")] == ["/mnt/boot"]
    if f.ro_mount:
        assert boot_mount[("Mount", "What")] == ["/dev/disk/by-label/flash-boot"]
        assert "ro" in boot_mount[("Mount", "Options")][0].split(",")
        tmp = unit("mnt-boottmp.mount")
        assert (tmp[("Mount", "Where")], tmp[("Mount", "Type")]) == (["/mnt/boottmp"],
                                                                      ["tmpfs"])
        assert "/mnt/boottmp/config.json" in unit("temp-conf.service")[("Service",
                                                                         "ExecStart")][0]
    else:
        orig = unit("mnt-bootorig.mount")
        assert orig[("Mount", "What")] == ["/dev/disk/by-label/flash-boot"]
        assert orig[("Mount", "Where")] == ["/mnt/bootorig"]
        for mount in (orig, boot_mount):  # flash-boot read-write in 2.12
            assert "ro" not in ",".join(mount.get(("Mount", "Options"), [])).split(",")

    flasher_unit = unit("resin-init-flasher.service")
    assert "mnt-boot.mount" in words(flasher_unit, "Unit", "Requires")
    wants_words = words(flasher_unit, "Unit", "Wants")
    assert "resin-device-register.service" in wants_words
    assert ("openvpn.service" in wants_words) == f.wants_openvpn
    after = words(flasher_unit, "Unit", "After")
    assert ("resin-device-register.service" in after) == f.after_register
    assert flasher_unit[("Service", "ExecStart")] == ["/bin/bash /usr/bin/resin-init-flasher"]
    assert "resin-boot.service" in words(unit("resin-device-register.service"), "Unit", "After")


def test_inner_image_table(flasher: Flasher, inner_image: Path) -> None:
    """The resinOS image: msdos, resin-boot FAT16 with the boot flag, resin-rootA/B,
    resin-state and resin-data of the release's sizes."""
    f, img = flasher.facts, inner_image
    p = check_msdos_layout(img, [f.boot_mib, f.root_mib, f.root_mib], [f.state_mib, f.data_mib])
    boot = probe(img, p[1])
    assert (boot["TYPE"], boot["VERSION"], boot["LABEL"]) == ("vfat", "FAT16", "resin-boot")
    for n, label in ((2, "resin-rootA"), (3, "resin-rootB"), (5, "resin-state"),
                     (6, "resin-data")):
        info = probe(img, p[n])
        assert (info["TYPE"], info["LABEL"]) == ("ext4", label)
    sh("e2fsck", "-fn", ext4(img, p[2]))
    osr = key_values(debugfs(ext4(img, p[2]), "cat /etc/os-release"))
    assert (osr["VERSION"], osr["MACHINE"]) == (f.release, f.machine)


def test_inner_image_boot(flasher: Flasher, inner_image: Path) -> None:
    """From balena-intel v2.21 the image boots a legacy BIOS by itself (GRUB in its MBR,
    core.img after it, /grub/grub.cfg); 2.12's leaves that to the flasher, which writes
    resin-boot's /grub/boot.img and core.img and copies grub.cfg_internal."""
    f, img = flasher.facts, inner_image
    p = sfdisk_partitions(img)
    files = fat_files(img, p[1])
    check_grub_boot_code(img, present=f.image_boots_bios)
    assert ("grub/grub.cfg" in files) == f.image_boots_bios
    assert "grub.cfg" not in files
    assert {"grub/boot.img", "grub/core.img", "grub/i386-pc"} <= files
    if f.image_boots_bios:
        assert b"root=LABEL=resin-rootA" in fat_read(img, p[1], "grub/grub.cfg")
    assert ("vmlinuz" in files) == f.kernel_on_boot
    assert ext4_exists(ext4(img, p[2]), "/boot/bzImage") == (not f.kernel_on_boot)


def test_inner_image_extraction_and_build_agree(tmp_path: Path) -> None:
    """The sparse extraction above reads what debugfs cat reads, and the flasher's inner
    image is the row's resinOS image (build_resinos_image)."""
    f = reference_facts(DEFAULT.name)
    img = cached_flasher(FlasherSpec(release=DEFAULT))
    fs = ext4(img, sfdisk_partitions(img)[2])
    out = ext4_extract_sparse(fs, f"/opt/{f.inner}", tmp_path / "inner.img")
    digest = content_digest(out)
    cat = ["debugfs", "-R", f"cat /opt/{f.inner}", fs]
    assert stream_digest(cat, out.stat().st_size) == digest
    assert digest == content_digest(cached_resinos(DEFAULT))


@pytest.mark.parametrize("row", ["2.12", DEFAULT.name])
def test_efi_only_image(row: str, tmp_path: Path) -> None:
    """efi_only: an image from before balena-intel v2.9.2: no BIOS boot code at all."""
    img = tmp_path / "efi.img"
    build_resinos_image(img, RELEASES[row], efi_only=True)
    f = reference_facts(row)
    p = check_msdos_layout(img, [f.boot_mib, f.root_mib, f.root_mib], [f.state_mib, f.data_mib])
    check_grub_boot_code(img, present=False)
    files = fat_files(img, p[1])
    assert "EFI/BOOT/bootx64.efi" in files
    assert not any(n == "grub/i386-pc" or n.startswith("grub/i386-pc/") for n in files)
    assert "grub/grub.cfg" not in files and "grub/core.img" not in files


# ----------------------------------------------------------------------------- the knobs


def test_flasher_without_rootA() -> None:
    img = cached_flasher(FlasherSpec(with_rootA=False))
    p = sfdisk_partitions(img)
    assert p[2].size > 0 and p[2].size % ALIGN_S == 0
    assert probe(img, p[2]) == {}
    assert is_zero(img, p[2])
    assert probe(img, p[1])["LABEL"] == "flash-boot"


def test_flasher_without_inner_image() -> None:
    img = cached_flasher(FlasherSpec(with_inner_image=False))
    fs = ext4(img, sfdisk_partitions(img)[2])
    sh("e2fsck", "-fn", fs)
    assert ext4_ls(fs, "/opt") == {}
    f = reference_facts(DEFAULT.name)
    conf = key_values(debugfs(fs, "cat /etc/resin-init-flasher.conf"))
    assert conf[f.image_key] == f.inner  # the config still names it


def test_gpt_flasher() -> None:
    """generic-amd64's table: GPT, no extended partition, the ESP first."""
    img = cached_flasher(FlasherSpec(gpt=True))
    assert sfdisk_json(img)["label"] == "gpt"
    p = sfdisk_partitions(img)
    assert p[1].type == GPT_ESP
    assert all(part.type == GPT_LINUX for n, part in p.items() if n != 1)
    assert all(part.start % ALIGN_S == 0 for part in p.values())
    assert probe(img, p[1])["LABEL"] == "flash-boot"
    assert probe(img, p[2])["LABEL"] == "flash-rootA"
    # EFI only: no BIOS boot code, the primary GPT header whole in sector 1
    assert b"GRUB" not in read_at(img, 0, S)[:440]
    assert read_at(img, S, 8) == b"EFI PART"
    assert sh("sfdisk", "--verify", img).returncode == 0


def test_signed_flasher() -> None:
    """A signed build: the image's .sig beside it in /opt, /balena-keys on flash-boot."""
    img = cached_flasher(FlasherSpec(signed=True))
    p = sfdisk_partitions(img)
    f = reference_facts(DEFAULT.name)
    opt = ext4_ls(ext4(img, p[2]), "/opt")
    assert set(opt) == {f.inner, f"{f.inner}.sig"}
    assert opt[f"{f.inner}.sig"][1] > 0
    files = fat_files(img, p[1])
    assert "balena-keys" in files and any(n.startswith("balena-keys/") for n in files)


def test_flasher_without_flasher_unit(tmp_path: Path) -> None:
    img = cached_flasher(FlasherSpec(with_flasher_unit=False))
    tree = rdump_tree(ext4(img, sfdisk_partitions(img)[2]), tmp_path / "tree")
    assert not (tree / "lib/systemd/system/resin-init-flasher.service").exists()
    wants = tree / "etc/systemd/system/multi-user.target.wants"
    assert not os.path.lexists(wants / "resin-init-flasher.service")
    assert is_enabled(tree, "resin-init-flasher.service")[0] != 0
    assert is_enabled(tree, "resin-device-register.service") == (0, "enabled")


# ----------------------------------------------------------------------------- builders


def test_builds_are_byte_identical(tmp_path: Path) -> None:
    again = tmp_path / "again.img"
    build_flasher_image(again)
    assert content_digest(again) == content_digest(cached_flasher(FlasherSpec()))
    build_resinos_image(again)
    same = content_digest(again)
    assert same == content_digest(cached_resinos(DEFAULT))
    build_resinos_image(again, seed=2)
    assert content_digest(again) != same


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
    with pytest.raises(CommandError) as info:
        imaging.run(["e2fsck", "-fn", tmp_path / "missing.img"])
    assert info.value.returncode != 0
    assert "e2fsck -fn" in str(info.value) and "missing.img" in str(info.value)
    # debugfs exits 0 on a failed request: its stderr still makes it an error
    img = cached_flasher(FlasherSpec(with_inner_image=False))
    with pytest.raises(CommandError) as info:
        imaging.debugfs(ext4(img, sfdisk_partitions(img)[2]), ["stat /no/such/file"])
    assert "debugfs" in str(info.value) and "/no/such/file" not in info.value.argv


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"),
                    reason="needs root to run the build as an unprivileged user")
def test_unprivileged_build_is_identical() -> None:
    """mkfs.ext4 -d copies the builder's uid/gid: the build fixes ownership afterwards, so
    a build by nobody from a copy of the package gives the same bytes."""
    here = Path(__file__).parent
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.chmod(work, 0o777)
        (work / "tests").mkdir(mode=0o755)
        for name in ("__init__.py", "imaging.py", "releases.py", "synthetic.py"):
            shutil.copy(here / name, work / "tests" / name)
        out = work / "user.img"
        sh("runuser", "-u", "nobody", "--", "env", "-i", "PATH=/usr/bin:/bin",
           "HOME=/nonexistent", "python3", "-m", "tests.synthetic", out, cwd=work)
        assert out.stat().st_uid != 0
        assert content_digest(out) == content_digest(cached_flasher(FlasherSpec()))
