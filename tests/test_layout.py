"""The Layout model: from parted's text, from the reference files, round trips; GPT
disks told by their protective MBR."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from builder.layout import ReferenceLayout, has_protective_mbr, parse_parted_print
from runtime.layout import Layout, LayoutError

# `parted IMAGE unit s print` of a 2.x intel-nuc flasher (REFERENCE.md), with the header
# lines parted prints before the table.
REFERENCE_PRINT = """\
Model:  (file)
Disk /tmp/resin-intel-nuc-2.x-flasher.img: 1040384s
Sector size (logical/physical): 512B/512B
Partition Table: msdos
Disk Flags:

Number  Start     End       Size     Type      File system  Flags
 1      8192s     90111s    81920s   primary   fat16        boot, lba
 2      90112s    991231s   901120s  primary   ext4
 3      991232s   999423s   8192s    primary   ext4
 4      999424s   1040383s  40960s   extended               lba
 5      1007616s  1015807s  8192s    logical
 6      1024000s  1040383s  16384s   logical
"""


def _without_labels(layout: Layout) -> dict:
    data = layout.to_dict()
    for part in data["partitions"]:
        part["label"] = None
    return data


def test_parted_text_gives_the_reference_flasher_layout() -> None:
    parsed = parse_parted_print(REFERENCE_PRINT)
    reference = ReferenceLayout.load("intel-nuc-flasher").layout
    expected = _without_labels(reference)
    # parted cannot see a filesystem on the unformatted logical partitions, nor names.
    assert parsed.to_dict() == expected


def test_parted_text_without_header_takes_the_disk_end_from_the_table() -> None:
    table_only = REFERENCE_PRINT[REFERENCE_PRINT.index("Number"):]
    parsed = parse_parted_print(table_only)
    assert parsed.disk_size == 1040384
    assert [p.kind for p in parsed.partitions] == [
        "primary", "primary", "primary", "extended", "logical", "logical"]
    assert parsed.partitions[0].flags == ("boot", "lba")


def test_parted_text_in_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="unit s"):
        parse_parted_print("Number  Start   End     Size    Type     File system  Flags\n"
                           " 1      4194kB  46.1MB  41.9MB  primary  fat16        boot\n")


def test_reference_files_are_consistent() -> None:
    flasher = ReferenceLayout.load("intel-nuc-flasher")
    resinos = ReferenceLayout.load("resinos-image")
    assert flasher.formatted_labels() == ["flash-boot", "flash-rootA", "flash-rootB"]
    assert resinos.formatted_labels() == [
        "resin-boot", "resin-rootA", "resin-rootB", "resin-state", "resin-data"]
    # the resinOS image reserves its first 4 MiB for GRUB
    assert resinos.layout.partitions[0].start * 512 == resinos.roles["reserved_bytes"]
    # logical partitions lie inside the extended one
    for reference in (flasher, resinos):
        extended = next(p for p in reference.layout.partitions if p.kind == "extended")
        for part in reference.layout.partitions:
            if part.kind == "logical":
                assert extended.start < part.start and part.end <= extended.end


def test_layout_round_trips_and_rejects_bad_values() -> None:
    layout = ReferenceLayout.load("resinos-image").layout
    assert Layout.from_dict(layout.to_dict()) == layout
    bad = layout.to_dict()
    bad["partitions"][1]["label"] = "resin-rootA;reboot"
    with pytest.raises(LayoutError, match=r"partitions\[1\]\.label"):
        Layout.from_dict(bad)
    past_end = layout.to_dict()
    past_end["disk_size"] = 1000
    with pytest.raises(LayoutError, match="past the end of the disk"):
        Layout.from_dict(past_end)


def test_a_gpt_disk_is_told_by_its_protective_mbr(tmp_path: Path) -> None:
    disks = {}
    for table in ("dos", "gpt"):
        disk = tmp_path / f"{table}.img"
        with disk.open("wb") as handle:
            handle.truncate(64 << 20)
        subprocess.run(["sfdisk", "-q", str(disk)], check=True,
                       input=f"label: {table}\nstart=2048, size=8192\n".encode())
        disks[table] = disk
    assert has_protective_mbr(disks["gpt"]) and not has_protective_mbr(disks["dos"])
    # with its primary GPT header overwritten (sector 1), it is still a GPT disk
    with disks["gpt"].open("r+b") as handle:
        handle.seek(512)
        handle.write(b"\0" * 512)
    assert has_protective_mbr(disks["gpt"])
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(4096))
    assert not has_protective_mbr(blank)
