"""The legacy-device rig, checked with independent tools (sfdisk, blkid, debugfs, tar,
the GRUB tools of the image itself in a chroot)."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from tests.rig import rootfs
from tests.rig.legacy import (
    APPDATA_DIR,
    APPDATA_EMPTY_DIRS,
    APPDATA_OWNERS,
    APPDATA_SYMLINKS,
    CYLINDER,
    DISK_ID,
    ROOT_LABEL,
    ROOT_UUID,
    SWAPFILE_MIB,
    Alignment,
    LegacySpec,
    SwapPlacement,
    appdata_files,
    attached,
    cached_legacy_image,
    chroot_binds,
    copy_legacy_image,
    fstab_text,
    mounted_root,
    partitions,
    sfdisk_script,
    spec_of_image,
)
from tests.tools import blkid, debugfs_cat, sfdisk_json, sfdisk_partitions

PRIMARY = LegacySpec()
LOGICAL = LegacySpec(placement=SwapPlacement.LOGICAL)
SWAPFILE = LegacySpec(with_swap_partition=False)
#: the oldtools e2e scenario's disk: p1 at sector 63, DOS cylinders
CYLINDER_LOGICAL = LegacySpec(placement=SwapPlacement.LOGICAL, alignment=Alignment.CYLINDER)
MiB = 1 << 20


def sh(*argv: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        check=check,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
    )


def loops_of(image: Path) -> str:
    return sh("losetup", "-j", image).stdout.strip()


def mounts_mentioning(*words: str) -> list[str]:
    with open("/proc/mounts") as f:
        return [ln for ln in f if any(w in ln for w in words)]


# --------------------------------------------------------------------------- no root


def test_layouts_in_sectors() -> None:
    primary = [(p.number, p.start, p.size, p.type, p.bootable) for p in partitions(PRIMARY)]
    assert primary == [
        (1, 2048, 1536 * 2048, "83", True),
        (2, 1537 * 2048, 1024 * 2048, "82", False),
    ]
    logical = {p.number: p for p in partitions(LOGICAL)}
    assert sorted(logical) == [1, 2, 5]
    assert logical[2].type == "5" and logical[2].end == 3072 * 2048  # extended to the end
    assert logical[5].start == logical[2].start + 2048 and logical[5].end <= logical[2].end
    only = partitions(SWAPFILE)
    assert [(p.number, p.start, p.end, p.type) for p in only] == [(1, 2048, 3072 * 2048, "83")]
    assert f"label-id: 0x{DISK_ID:08x}" in sfdisk_script(LOGICAL)


def test_cylinder_layouts_in_sectors() -> None:
    """As fdisk made them in DOS compatibility mode: p1 at 63, ends on cylinders (255 heads,
    63 sectors), the extended partition to the last whole cylinder, p5 63 sectors into it."""
    logical = {p.number: p for p in partitions(CYLINDER_LOGICAL)}
    assert sorted(logical) == [1, 2, 5]
    root, ext, swap = logical[1], logical[2], logical[5]
    assert (root.start, root.end, root.type, root.bootable) == (63, 196 * CYLINDER, "83", True)
    assert (ext.start, ext.end, ext.type) == (root.end, 391 * CYLINDER, "5")
    assert ext.end <= 3072 * 2048 < ext.end + CYLINDER
    assert swap.start == ext.start + 63 and swap.end == ext.start + 131 * CYLINDER
    assert swap.size * 512 >= 1024 * MiB and root.size * 512 >= 1536 * MiB
    primary = partitions(LegacySpec(alignment=Alignment.CYLINDER))
    assert [(p.number, p.start, p.end, p.type) for p in primary] == [
        (1, 63, 196 * CYLINDER, "83"), (2, 196 * CYLINDER, 327 * CYLINDER, "82")]
    only = partitions(LegacySpec(with_swap_partition=False, alignment=Alignment.CYLINDER))
    assert [(p.number, p.start, p.end) for p in only] == [(1, 63, 391 * CYLINDER)]
    assert "start=63, size=3148677, type=83, bootable" in sfdisk_script(CYLINDER_LOGICAL)


def test_spec_refuses_what_cannot_exist() -> None:
    with pytest.raises(ValueError, match="fstab_swap"):
        LegacySpec(fstab_swap="PARTUUID")
    with pytest.raises(ValueError, match="do not fit"):
        LegacySpec(disk_mib=2048, root_mib=1536, swap_mib=1024)
    with pytest.raises(ValueError, match="do not fit"):  # p5 needs 1 MiB for its EBR
        LegacySpec(placement=SwapPlacement.LOGICAL, disk_mib=2561)
    LegacySpec(placement=SwapPlacement.PRIMARY, disk_mib=2561)
    with pytest.raises(ValueError, match="63 sectors, whole cylinders"):
        LegacySpec(placement=SwapPlacement.LOGICAL, alignment=Alignment.CYLINDER, disk_mib=2561)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (PRIMARY, f"UUID={PRIMARY.swap_uuid} none"),
        (LegacySpec(fstab_swap="LABEL"), "LABEL=legacy-swap none"),
        (LegacySpec(fstab_swap="PATH"), "/dev/sda2 none"),
        (LegacySpec(placement=SwapPlacement.LOGICAL, fstab_swap="PATH"), "/dev/sda5 none"),
        (SWAPFILE, "/swapfile "),
    ],
)
def test_fstab_text(spec: LegacySpec, expected: str) -> None:
    entries = [ln.split() for ln in fstab_text(spec).splitlines() if ln and ln[0] != "#"]
    assert entries[0] == [f"UUID={ROOT_UUID}", "/", "ext4", "errors=remount-ro", "0", "1"]
    assert len(entries) == 2 and entries[1][1:4] == ["none", "swap", "sw"]
    assert " ".join(entries[1]).startswith(expected)


def test_mirror_from_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    deb822 = (
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\n"
    )
    assert rootfs._sources_mirror(deb822, "bookworm") == "http://mirror.example/debian"
    assert rootfs._sources_mirror(deb822, "trixie") is None
    one_line = "# c\ndeb [arch=amd64] http://m.example/debian bookworm main\n"
    assert rootfs._list_mirror(one_line, "bookworm") == "http://m.example/debian"
    monkeypatch.setenv("RESIN_MIGRATE_DEBIAN_MIRROR", "http://override.example/debian")
    assert rootfs.debian_mirror() == "http://override.example/debian"


def test_appdata_is_deterministic() -> None:
    files = appdata_files()
    assert files == appdata_files()
    total = sum(map(len, files.values()))
    assert 1.5 * MiB < total < 2.5 * MiB
    assert any(b"\0" in data for data in files.values())  # a binary file
    assert max(rel.count("/") for rel in files) >= 3  # nested directories


def test_grub_defaults_edit() -> None:
    text = "#GRUB_TERMINAL=console\nGRUB_DEFAULT=saved\nOTHER=1\n"
    out = rootfs._set_shell_vars(
        text, {"GRUB_TERMINAL": '"serial console"', "GRUB_DEFAULT": "0", "GRUB_TIMEOUT": "1"}
    )
    assert out == 'GRUB_TERMINAL="serial console"\nGRUB_DEFAULT=0\nOTHER=1\nGRUB_TIMEOUT=1\n'


# --------------------------------------------------------------------------- root: rootfs


@pytest.mark.loop
def test_rootfs_tarball() -> None:
    tarball = rootfs.debian_rootfs()
    assert tarball.name == f"rootfs-{rootfs.rootfs_key()}.tar.zst"
    listing = sh("tar", "-I", "zstd -d -T0", "-tvf", tarball).stdout.splitlines()
    names = {ln.split()[-1] if "->" not in ln else ln.split()[-3] for ln in listing}
    root_entry = next(ln for ln in listing if ln.endswith(" ./"))
    assert root_entry.startswith("drwxr-xr-x 0/0")
    for required in (
        "./usr/sbin/grub-mkconfig",
        "./usr/lib/grub/i386-pc/boot.img",
        "./usr/bin/python3",
        "./usr/sbin/sfdisk",
        "./usr/bin/zstd",
        "./etc/default/grub",
        "./sbin",
    ):
        assert required in names, required
    assert any(n.startswith("./boot/vmlinuz-") for n in names)
    assert any(n.startswith("./boot/initrd.img-") for n in names)
    assert not any(n.startswith("./var/cache/apt/archives/") and n.endswith(".deb") for n in names)


# --------------------------------------------------------------------------- root: images


@pytest.mark.loop
@pytest.mark.parametrize(
    "spec", [PRIMARY, LOGICAL, SWAPFILE], ids=["primary", "logical", "swapfile"]
)
def test_partition_table(spec: LegacySpec) -> None:
    image = cached_legacy_image(spec)  # read only
    assert image.stat().st_size == spec.disk_mib * MiB
    assert image.stat().st_blocks * 512 < 1024 * MiB  # sparse
    table = sfdisk_json(image)
    assert table["label"] == "dos" and int(table["id"], 16) == DISK_ID
    assert table["unit"] == "sectors"
    parts = sfdisk_partitions(image)
    assert parts[1].type == "83" and parts[1].bootable
    assert parts[1].start == 2048
    assert all(p.start % 2048 == 0 for p in parts.values())
    if spec is SWAPFILE:
        assert sorted(parts) == [1]
        assert parts[1].end == spec.disk_mib * 2048
    elif spec is PRIMARY:
        assert sorted(parts) == [1, 2]
        assert parts[2].type == "82" and not parts[2].bootable
        assert parts[2].start == parts[1].end
        assert parts[2].size == spec.swap_mib * 2048
    else:
        assert sorted(parts) == [1, 2, 5]
        ext, swap = parts[2], parts[5]
        assert ext.type == "5" and swap.type == "82"
        assert ext.start == parts[1].end
        assert ext.start < swap.start
        assert swap.end <= ext.end
        assert ext.end == spec.disk_mib * 2048
        assert swap.size == spec.swap_mib * 2048


@pytest.mark.loop
@pytest.mark.parametrize(
    "spec",
    [
        PRIMARY,
        LOGICAL,
        LegacySpec(placement=SwapPlacement.LOGICAL, fstab_swap="LABEL"),
        LegacySpec(fstab_swap="PATH"),
    ],
    ids=["primary-uuid", "logical-uuid", "logical-label", "primary-path"],
)
def test_filesystems_and_fstab(spec: LegacySpec) -> None:
    image = cached_legacy_image(spec)
    with attached(image, spec, read_only=True) as dev:
        root = blkid(dev.partition(1))
        assert root["TYPE"] == "ext4" and root["LABEL"] == ROOT_LABEL and root["UUID"] == ROOT_UUID
        assert root["PART_ENTRY_FLAGS"] == "0x80"
        assert dev.swap == dev.partition(spec.swap_number or 0)
        swap = blkid(dev.swap)
        assert swap["TYPE"] == "swap"
        assert swap["UUID"] == spec.swap_uuid and swap["LABEL"] == spec.swap_label
        assert swap["PART_ENTRY_TYPE"] == "0x82"
        assert swap["PART_ENTRY_NUMBER"] == str(spec.swap_number)
        fstab = debugfs_cat(dev.root, "/etc/fstab").decode()
        assert fstab == fstab_text(spec)
        swap_source = next(
            ln.split()[0] for ln in fstab.splitlines() if ln[:1] != "#" and " swap " in ln
        )
        expected = {
            "UUID": f"UUID={swap['UUID']}",
            "LABEL": f"LABEL={swap['LABEL']}",
            "PATH": f"/dev/sda{swap['PART_ENTRY_NUMBER']}",
        }[spec.fstab_swap]
        assert swap_source == expected
        assert sh("e2fsck", "-fn", dev.root, check=False).returncode == 0
    assert loops_of(image) == ""


@pytest.mark.loop
def test_system_files_and_appdata(tmp_path: Path) -> None:
    image = copy_legacy_image(LOGICAL, tmp_path / "disk.img")
    with attached(image, LOGICAL) as dev, mounted_root(dev) as sysroot:
        assert stat.S_IMODE(sysroot.stat().st_mode) == 0o755
        assert (sysroot / "etc/hostname").read_text() == "legacy-device\n"
        grub_defaults = (sysroot / "etc/default/grub").read_text().splitlines()
        for line in (
            "GRUB_DEFAULT=0",
            "GRUB_TIMEOUT=1",
            'GRUB_CMDLINE_LINUX="console=ttyS0,115200"',
            'GRUB_TERMINAL="serial console"',
        ):
            assert line in grub_defaults
        cfg = (sysroot / "boot/grub/grub.cfg").read_text()
        assert f"root=UUID={ROOT_UUID} " in cfg and "console=ttyS0,115200" in cfg
        assert (sysroot / "boot/grub/grubenv").stat().st_size == 1024
        assert list((sysroot / "boot").glob("vmlinuz-*"))
        assert "root::" in (sysroot / "etc/shadow").read_text()  # no password

        base = sysroot / APPDATA_DIR
        for rel, data in appdata_files().items():
            assert (base / rel).read_bytes() == data, rel
        for rel, target in APPDATA_SYMLINKS.items():
            assert os.readlink(base / rel) == target
        for rel in APPDATA_EMPTY_DIRS:
            assert (base / rel).is_dir() and not any((base / rel).iterdir())
        for rel, (uid, gid, mode) in APPDATA_OWNERS.items():
            st = (base / rel).lstat()
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, mode)


@pytest.mark.loop
def test_swapfile_variant(tmp_path: Path) -> None:
    image = copy_legacy_image(SWAPFILE, tmp_path / "disk.img")
    with attached(image, SWAPFILE) as dev, mounted_root(dev) as sysroot:
        assert dev.swap is None
        swapfile = sysroot / "swapfile"
        st = swapfile.stat()
        assert st.st_size == SWAPFILE_MIB * MiB and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_blocks * 512 >= st.st_size  # no holes: swapon would refuse it
        assert blkid(swapfile)["TYPE"] == "swap"
        assert (sysroot / "etc/fstab").read_text() == fstab_text(SWAPFILE)


@pytest.mark.loop
def test_grub_tools_in_a_chroot(tmp_path: Path) -> None:
    """What the runtime does: chroot into the sysroot with the host's /dev, /proc, /sys."""
    image = copy_legacy_image(PRIMARY, tmp_path / "disk.img")
    with attached(image, PRIMARY) as dev, mounted_root(dev) as sysroot, chroot_binds(sysroot):
        listed = sh("chroot", sysroot, "grub-editenv", "list")
        assert listed.stdout == ""
        sh("chroot", sysroot, "grub-reboot", "1")
        assert sh("chroot", sysroot, "grub-editenv", "list").stdout == "next_entry=1\n"
        sh("chroot", sysroot, "grub-editenv", "/boot/grub/grubenv", "unset", "next_entry")
        sh("chroot", sysroot, "update-grub")
        cfg = (sysroot / "boot/grub/grub.cfg").read_text()
        # without udev (no /dev/disk/by-uuid) update-grub names the loop partition
        assert f"root={dev.root} " in cfg or f"root=UUID={ROOT_UUID} " in cfg
        assert f"search --no-floppy --fs-uuid --set=root {ROOT_UUID}" in cfg
    assert loops_of(image) == ""
    assert mounts_mentioning(str(sysroot), dev.root) == []


@pytest.mark.loop
def test_cleanup_when_the_body_raises(tmp_path: Path) -> None:
    """Binds left behind (as a crashed runtime leaves them), one mount busy: everything
    is unmounted (lazily where busy), partitions removed, the loop device detached."""
    image = copy_legacy_image(PRIMARY, tmp_path / "disk.img")
    seen = {}
    with pytest.raises(RuntimeError, match="boom"), attached(image, PRIMARY) as dev:
        seen["device"] = dev.device
        assert loops_of(image).startswith(dev.device + ":")
        assert Path(dev.partition(2)).exists()
        busy = None
        try:
            with mounted_root(dev) as sysroot:
                seen["sysroot"] = str(sysroot)
                for sub in ("dev", "proc", "sys"):
                    sh("mount", "--bind", f"/{sub}", sysroot / sub)
                sh("mount", "-t", "tmpfs", "tmpfs", sysroot / "run")
                busy = open(sysroot / "etc/hostname")  # noqa: SIM115  (umount -R: busy)
                assert len(mounts_mentioning(seen["sysroot"] + " ")) == 1
                assert len(mounts_mentioning(seen["sysroot"])) == 5
                raise RuntimeError("boom")
        finally:
            assert mounts_mentioning(seen["sysroot"]) == []  # detached lazily
            assert not Path(seen["sysroot"]).exists()
            if busy is not None:
                busy.close()  # the lazily unmounted filesystem goes with its last user
    assert loops_of(image) == ""
    assert mounts_mentioning(seen["sysroot"], seen["device"] + "p") == []


@pytest.mark.loop
def test_cleanup_of_a_clean_run(tmp_path: Path) -> None:
    image = copy_legacy_image(LOGICAL, tmp_path / "disk.img")
    with attached(image, LOGICAL) as dev:
        nodes = [dev.partition(n) for n in (1, 2, 5)]
        assert all(Path(n).exists() for n in nodes)
        with mounted_root(dev) as sysroot:
            assert (sysroot / "etc/fstab").exists()
        assert not sysroot.exists()
    assert loops_of(image) == ""
    assert mounts_mentioning(str(sysroot), dev.device + "p") == []


@pytest.mark.loop
@pytest.mark.parametrize(
    "spec", [PRIMARY, LOGICAL, SWAPFILE], ids=["primary", "logical", "swapfile"]
)
def test_spec_read_back_from_the_table(spec: LegacySpec) -> None:
    assert spec_of_image(cached_legacy_image(spec)) == spec


@pytest.mark.loop
def test_cylinder_table_as_old_fdisk_wrote_it() -> None:
    """sfdisk reads the spec's sectors; p5's boot record is the extended partition's first
    sector with p5 63 sectors after it; the rig's core.img ends before p1 (its ext4
    superblock intact); spec_of_image gives a spec of the same table."""
    image = cached_legacy_image(CYLINDER_LOGICAL)
    parts = {p.number: p for p in partitions(CYLINDER_LOGICAL)}
    found = {n: (p.start, p.size, p.type) for n, p in sfdisk_partitions(image).items()}
    assert found == {n: (p.start, p.size, p.type) for n, p in parts.items()}
    with open(image, "rb") as f:
        f.seek(parts[2].start * 512)
        ebr = f.read(512)
        f.seek(63 * 512 + 1024 + 0x38)
        ext4_magic = f.read(2)
    assert ebr[510:] == b"\x55\xaa"
    kind, rel_start, size = struct.unpack_from("<4xB3xII", ebr, 446)
    assert (kind, rel_start, size) == (0x82, 63, parts[5].size)
    assert ebr[446 + 16:446 + 32] == bytes(16)  # the last logical: no link
    assert ext4_magic == b"\x53\xef"
    read_back = spec_of_image(image)
    assert read_back.alignment is Alignment.CYLINDER
    assert partitions(read_back) == partitions(CYLINDER_LOGICAL)


@pytest.mark.loop
def test_cleanup_after_the_body_repartitions(tmp_path: Path) -> None:
    """The runtime repartitions with BLKPG: partitions gone or added in the kernel only."""
    image = copy_legacy_image(LOGICAL, tmp_path / "disk.img")
    with attached(image) as dev:  # spec read from the table
        assert dev.spec == LOGICAL and dev.swap == dev.partition(5)
        sh("delpart", dev.device, 5)
        sh("addpart", dev.device, 6, 2700 * 2048, 2048)
        sh("addpart", dev.device, 7, 2800 * 2048, 2048)
        assert Path(dev.partition(7)).exists() and not Path(dev.partition(5)).exists()
    assert loops_of(image) == ""
