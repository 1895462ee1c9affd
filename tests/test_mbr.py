"""The runtime's own msdos table model (runtime/mbr.py, runtime/disk.py) against the tools
that wrote tables before it: tables sfdisk, fdisk and parted made read to the partitions
sfdisk --json lists, and give back their own bytes when written again; tables the model
writes pass sfdisk --verify and read back alike in sfdisk, parted and blkid; BLKPG adds and
deletes partitions of a loop device whose first partition is mounted.

Sparse files need no root; the loop-device tests are marked `loop`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from runtime import blockdev, disk, mbr
from runtime.layout import Partition
from runtime.manifest import dumps, loads
from runtime.plan import Placement, place
from tests.test_manifest import _manifest
from tests.tools import sfdisk_json, sfdisk_partitions

GIB = 1 << 30
MIB_SECTORS = 2048


def _image(tmp_path: Path, name: str = "disk.img", size: int = 4 * GIB) -> Path:
    image = tmp_path / name
    with image.open("wb") as handle:
        handle.truncate(size)
    return image


def _sh(*argv: str, stdin: str | None = None) -> str:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
    return result.stdout


def by_sfdisk(image: Path, script: str) -> Path:
    _sh("sfdisk", "-q", str(image), stdin=script)
    return image


def by_fdisk(image: Path, keys: str) -> Path:
    """fdisk driven at its prompts, in DOS-compatible mode with sectors as units: p1 at
    sector 63 and each logical partition 63 sectors after its EBR, as installs before
    2009 and old Ubuntu/Debian installers partitioned."""
    subprocess.run(["fdisk", "-c=dos", "-u=sectors", str(image)], input=keys, text=True,
                   capture_output=True, check=True)
    return image


def by_parted(image: Path, *commands: str) -> Path:
    _sh("parted", "-s", str(image), "mklabel", "msdos", *commands)
    return image


def sfdisk_entries(image: Path | str) -> list[tuple]:
    """(number, start, size, type, bootable) of every partition, as sfdisk reads them."""
    return [(number, part.start, part.size, int(part.type, 16), part.bootable)
            for number, part in sorted(sfdisk_partitions(image).items())]


def model_entries(table: mbr.Table) -> list[tuple]:
    return [(number, start, size, type_id, bootable)
            for number, _kind, start, size, type_id, bootable in table.entries()]


def sectors(image: Path, numbers) -> dict[int, bytes]:
    with image.open("rb") as handle:
        found = {}
        for number in numbers:
            handle.seek(number * 512)
            found[number] = handle.read(512)
        return found


def parted_entries(image: Path) -> list[tuple]:
    """(number, start, end) in sectors from parted's machine-readable listing."""
    lines = _sh("parted", "-s", "-m", str(image), "unit", "s", "print").splitlines()
    found = []
    for line in lines[2:]:
        fields = line.rstrip(";").split(":")
        found.append((int(fields[0]), int(fields[1].rstrip("s")), int(fields[2].rstrip("s"))))
    return found


# Tables as the tools write them: each shape the devices have.
SHAPES = {
    "sfdisk primary swap": lambda image: by_sfdisk(
        image, "label: dos\nstart=2048, size=3000000, type=83, bootable\nstart=3002368, "
               "type=82\n"),
    "sfdisk logical swap": lambda image: by_sfdisk(
        image, "label: dos\nstart=2048, size=3000000, type=83, bootable\nstart=3002366, "
               "type=5\nstart=3002368, type=82\n"),
    # Ubuntu 14.04's installer: sda1 root, sda2 extended, sda5 swap
    "fdisk p1 at sector 63, logical swap": lambda image: by_fdisk(
        image, "o\nn\np\n1\n63\n+1500M\nn\ne\n2\n\n\nn\n\n+1000M\nt\n5\n82\nw\n"),
    # an extended partition whose first logical starts 63 sectors in, a second logical
    # after a gap, the swap last
    "fdisk gaps between logicals": lambda image: by_fdisk(
        image, "o\nn\np\n1\n63\n+1000M\nn\ne\n2\n\n\nn\n\n+100M\nn\n2355391\n+1000M\n"
               "t\n6\n82\nw\n"),
    "parted logical swap after a gap, extended type f": lambda image: by_parted(
        image, "mkpart", "primary", "ext4", "1MiB", "1500MiB", "mkpart", "extended",
        "1500MiB", "100%", "mkpart", "logical", "ext4", "1501MiB", "1600MiB", "mkpart",
        "logical", "linux-swap", "1700MiB", "2700MiB", "set", "1", "boot", "on"),
    "parted three primaries and swap": lambda image: by_parted(
        image, "mkpart", "primary", "ext4", "1MiB", "500MiB", "mkpart", "primary", "ext4",
        "500MiB", "1000MiB", "mkpart", "primary", "ext4", "1000MiB", "1500MiB", "mkpart",
        "primary", "linux-swap", "1500MiB", "2500MiB"),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_tables_the_tools_wrote_read_alike(tmp_path: Path, shape: str) -> None:
    image = SHAPES[shape](_image(tmp_path))
    table = disk.read_table(str(image))
    assert table.table == "msdos"
    assert model_entries(table) == sfdisk_entries(image)
    assert table.disk_id_text == sfdisk_json(image)["id"][2:]
    # written again unchanged, every record keeps its bytes (CHS fields included)
    records = sectors(image, [0] + sorted(table.ebrs.values()))
    encoded = mbr.encode(table, lambda sector: sectors(image, [sector])[sector])
    assert set(encoded) <= set(records) | {table.extended.start if table.extended else 0}
    assert {sector: encoded[sector] for sector in records} == records


def test_p1_at_sector_63_and_the_logical_63_sectors_after_its_ebr(tmp_path: Path) -> None:
    image = SHAPES["fdisk p1 at sector 63, logical swap"](_image(tmp_path))
    table = disk.read_table(str(image))
    assert table.number(1).start == 63
    swap = table.number(5)
    assert swap.type_id == 0x82 and swap.kind == "logical"
    assert table.extended.start == table.ebrs[5] == swap.start - 63


def _manifest_small():
    return loads(dumps(_manifest()))


def _placed(tmp_path: Path, shape: str) -> tuple[Path, mbr.Table, Placement]:
    """A disk of that shape, its table, and the flash partitions placed in its swap."""
    image = SHAPES[shape](_image(tmp_path))
    table = disk.read_table(str(image))
    swap = next(part for part in table.partitions if part.type_id == 0x82)
    return image, table, place(str(image), table, swap, _manifest_small())


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_tables_the_model_writes_read_alike_in_every_tool(tmp_path: Path, shape: str) -> None:
    image, table, placement = _placed(tmp_path, shape)
    before = sectors(image, [0])[0]
    disk.write_table(str(image), placement.new)
    assert model_entries(placement.new) == sfdisk_entries(image)
    assert disk.read_table(str(image)).entries() == placement.new.entries()
    verify = subprocess.run(["sfdisk", "--verify", str(image)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "Remaining" in verify.stdout and "overlap" not in verify.stdout.lower()
    # parted lists the same partitions (ends inclusive; the extended one too)
    assert parted_entries(image) == [(part.number, part.start, part.end - 1)
                                     for part in placement.new.partitions]
    probed = dict(line.split("=", 1) for line in _sh(
        "blkid", "-p", "-o", "export", str(image)).splitlines())
    assert probed["PTTYPE"] == "dos" and probed["PTUUID"] == table.disk_id_text
    # the disk keeps its boot code and identifier
    assert sectors(image, [0])[0][:446] == before[:446]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_saved_records_restore_the_table_byte_for_byte(tmp_path: Path, shape: str) -> None:
    image, original, placement = _placed(tmp_path, shape)
    saved = disk.records(str(image), placement.original, placement.new)
    disk.save_records(str(tmp_path / "saved.json"), saved)
    before = sectors(image, sorted(saved))
    disk.write_table(str(image), placement.new)
    assert sfdisk_entries(image) != model_entries(original)
    disk.restore_records(str(image), disk.load_records(str(tmp_path / "saved.json")))
    assert sectors(image, sorted(saved)) == before
    assert sfdisk_entries(image) == model_entries(original)


def _damaged(tmp_path: Path, offset: int, data: bytes) -> Path:
    image = SHAPES["sfdisk logical swap"](_image(tmp_path))
    with image.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)
    return image


@pytest.mark.parametrize("damage,message", [
    # the swap's EBR at 3002366 links back to itself
    ((3002366 * 512 + 446 + 16, bytes([0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])),
     "loops back"),
    ((3002366 * 512 + 510, b"\0\0"), None),   # first EBR unsigned: no logical partitions
    ((446, b"\x7f"), "status byte 0x7f"),
    ((446 + 16 + 4, b"\x00"), "type 0"),
])
def test_damaged_tables_are_refused_or_read_as_the_kernel_does(tmp_path: Path, damage,
                                                                message) -> None:
    image = _damaged(tmp_path, *damage)
    if message is None:
        assert disk.read_table(str(image)).logicals == []
        return
    with pytest.raises(mbr.TableError, match=message):
        disk.read_table(str(image))


def test_gpt_and_blank_disks_are_named(tmp_path: Path) -> None:
    blank = _image(tmp_path, "blank.img")
    assert disk.read_table(str(blank)).table == "none"
    gpt = _image(tmp_path, "gpt.img")
    _sh("sfdisk", "-q", str(gpt), stdin="label: gpt\nsize=100M\n")
    assert disk.read_table(str(gpt)).table == "gpt"


def test_the_table_survives_the_state_file(tmp_path: Path) -> None:
    image = SHAPES["fdisk gaps between logicals"](_image(tmp_path))
    table = disk.read_table(str(image))
    again = mbr.Table.from_dict(json.loads(json.dumps(table.to_dict())))
    assert again.entries() == table.entries() and again.ebrs == table.ebrs
    assert again.disk_id == table.disk_id


def test_an_entry_past_32_bits_is_refused() -> None:
    huge = mbr.Table("msdos", 1 << 34, [
        Partition(1, 2048, 1 << 32, "primary", type_id=0x83)])
    with pytest.raises(mbr.TableError, match="2 TiB"):
        mbr.encode(huge, lambda sector: bytes(512))


# --- the kernel, told with BLKPG while a partition of the disk is mounted ----------------

def _kernel(device: str) -> dict[int, tuple[int, int]]:
    return disk.kernel_partitions(device)


@pytest.mark.loop
def test_blkpg_adds_and_deletes_beside_a_mounted_partition(tmp_path: Path) -> None:
    image = SHAPES["fdisk p1 at sector 63, logical swap"](_image(tmp_path, size=3 * GIB))
    device = _sh("losetup", "-f", "--show", str(image)).strip()
    mountpoint = tmp_path / "root"
    mountpoint.mkdir()
    try:
        _sh("partx", "-a", device)
        _sh("mkfs.ext4", "-q", "-F", device + "p1")
        _sh("mount", device + "p1", str(mountpoint))
        original = disk.read_table(device)
        assert _kernel(device) == {1: (63, original.number(1).size),
                                   2: (original.extended.start, 2),
                                   5: (original.number(5).start, original.number(5).size)}
        placement = place(device, original, original.number(5), _manifest_small())
        saved = disk.records(device, placement.original, placement.new)
        disk.write_table(device, placement.new)
        disk.tell_kernel(device, placement.new)
        assert model_entries(placement.new) == sfdisk_entries(device)
        assert parted_entries(Path(device)) == [(part.number, part.start, part.end - 1)
                                                for part in placement.new.partitions]
        # sysfs, and the partitions' sizes by blockdev (an independent reader)
        expected = {part.number: (part.start, 2 if part.kind == "extended" else part.size)
                    for part in placement.new.partitions}
        assert _kernel(device) == expected
        for part in placement.flash:
            node = f"{device}p{part.number}"
            assert int(_sh("blockdev", "--getsz", node)) == part.size
        # PARTUUID= in fstab, as blkid (util-linux 2.24 and later) reports it
        for part in placement.new.partitions:
            if part.kind != "extended":
                assert _sh("blkid", "-p", "-o", "value", "-s", "PART_ENTRY_UUID",
                           f"{device}p{part.number}").strip() == original.partuuid(part.number)
        assert (mountpoint / "lost+found").is_dir()     # / stayed mounted throughout
        disk.restore_records(device, saved)
        disk.tell_kernel(device, disk.read_table(device))
        assert _kernel(device) == {1: (63, original.number(1).size),
                                   2: (original.extended.start, 2),
                                   5: (original.number(5).start, original.number(5).size)}
        # the mounted partition itself cannot be deleted: the kernel says it is busy
        with pytest.raises(OSError) as busy:
            blockdev.blkpg(device, blockdev.BLKPG_DEL_PARTITION, 1)
        assert blockdev.is_busy(busy.value)
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)
        subprocess.run(["partx", "-d", device], check=False)
        subprocess.run(["losetup", "-d", device], check=False)


@pytest.mark.loop
def test_sector_size_of_a_loop_device(tmp_path: Path) -> None:
    image = _image(tmp_path, size=64 << 20)
    device = _sh("losetup", "-f", "--show", str(image)).strip()
    try:
        assert blockdev.sector_size(device) == 512
        assert blockdev.size_sectors(device) == 64 << 11
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
