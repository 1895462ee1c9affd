"""Placing the flasher's partitions in the swap area: computed, then written by the runtime's
table writer to a sparse file and read back with sfdisk --json (no root needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from runtime.disk import read_table, write_table
from runtime.manifest import dumps, loads
from runtime.plan import CORE_SECTORS, PlanError, place
from tests.test_manifest import _manifest
from tests.tools import sfdisk_json

MIB_SECTORS = 2048
GIB = 1 << 30


def _disk(tmp_path: Path, script: str, size: int = 4 * GIB) -> Path:
    image = tmp_path / "disk.img"
    with image.open("wb") as handle:
        handle.truncate(size)
    subprocess.run(["sfdisk", "-q", str(image)], input=script.encode(), check=True)
    return image


def _dump(image: Path) -> str:
    return subprocess.run(["sfdisk", "-d", str(image)], capture_output=True, text=True,
                          check=True).stdout


def _apply(image: Path, layout) -> dict:
    write_table(str(image), layout.new)
    return sfdisk_json(image)


def _manifest_small():
    """The test manifest (flash-boot 40 MiB, flash-rootA 400 MiB, flash-data 64 MiB+)."""
    return loads(dumps(_manifest()))


PRIMARY = "label: dos\nstart=2048, size=3000000, type=83, bootable\nstart=3002368, type=82\n"
LOGICAL = ("label: dos\nstart=2048, size=3000000, type=83, bootable\n"
           "start=3002366, type=5\nstart=3002368, type=82\n")


def test_primary_swap_becomes_three_primaries(tmp_path: Path) -> None:
    image = _disk(tmp_path, PRIMARY)
    table = read_table(str(image))
    swap = table.number(2)
    before = _dump(image)
    layout = place(str(image), table, swap, _manifest_small(), reserve_bytes=100 << 20)
    assert [(f.label, f.number) for f in layout.flash] == [
        ("flash-boot", 2), ("flash-rootA", 3), ("flash-data", 4)]
    # the swap's first MiB, in no partition, holds the flasher's core.img
    assert layout.core_start == swap.start
    assert layout.flash[0].start == swap.start + CORE_SECTORS
    assert layout.flash[-1].end == swap.end
    assert layout.protected_start == swap.start
    written = _apply(image, layout)
    parts = {p["node"][len(str(image)):]: p for p in written["partitions"]}
    assert [f.type_id for f in layout.flash] == [0x0E, 0x83, 0x83]
    assert parts["1"]["start"] == 2048 and parts["1"]["bootable"] is True
    assert [parts[n]["type"] for n in "234"] == ["e", "83", "83"]
    assert parts["2"]["size"] == 40 * MIB_SECTORS
    assert parts["3"]["size"] == 400 * MIB_SECTORS
    assert parts["4"]["start"] + parts["4"]["size"] == swap.end
    # the disk keeps its identifier
    assert written["id"] == subprocess.run(["sfdisk", "--disk-id", str(image)],
                                           capture_output=True, text=True).stdout.strip()
    assert before.splitlines()[1] == _dump(image).splitlines()[1]


def test_logical_swap_becomes_three_logicals(tmp_path: Path) -> None:
    image = _disk(tmp_path, LOGICAL)
    table = read_table(str(image))
    swap = table.number(5)
    layout = place(str(image), table, swap, _manifest_small())
    assert [(f.label, f.number) for f in layout.flash] == [
        ("flash-boot", 5), ("flash-rootA", 6), ("flash-data", 7)]
    assert layout.protected_start == table.extended.start
    written = _apply(image, layout)
    nodes = [p["node"][len(str(image)):] for p in written["partitions"]]
    assert nodes == ["1", "2", "5", "6", "7"]
    extended = written["partitions"][1]
    for part in written["partitions"][2:]:
        assert extended["start"] < part["start"]
        assert part["start"] + part["size"] <= extended["start"] + extended["size"]
    assert layout.core_start == swap.start
    assert written["partitions"][2]["start"] == swap.start + CORE_SECTORS


def test_no_free_primary_slot_makes_an_extended_partition(tmp_path: Path) -> None:
    image = _disk(tmp_path, "label: dos\nstart=2048, size=1000000, type=83\n"
                            "start=1002048, size=1000000, type=83\nstart=2002944, type=82\n")
    table = read_table(str(image))
    layout = place(str(image), table, table.number(3), _manifest_small())
    assert layout.new_extended is not None and layout.new_extended.number == 3
    assert [f.number for f in layout.flash] == [5, 6, 7]
    written = _apply(image, layout)
    assert [p["type"] for p in written["partitions"]] == ["83", "83", "5", "e", "83", "83"]
    # the first boot record at the extended partition's start; the core.img after it, in
    # no partition, before the first logical one
    extended = written["partitions"][2]
    assert extended["start"] < layout.core_start
    assert layout.core_start + CORE_SECTORS <= written["partitions"][3]["start"]


def test_logical_swap_after_another_logical_protects_the_whole_chain(tmp_path: Path) -> None:
    image = _disk(tmp_path, LOGICAL.replace("start=3002368, type=82",
                                            "start=3002368, size=1000000, type=83\n"
                                            "start=4004416, type=82"))
    table = read_table(str(image))
    layout = place(str(image), table, table.number(6), _manifest_small())
    assert [f.number for f in layout.flash] == [6, 7, 8]
    # the first boot record, at the extended partition's start, links to the new ones
    assert layout.protected_start == table.extended.start == 3002366


def test_logical_partitions_after_the_swap_are_not_renumbered(tmp_path: Path) -> None:
    image = _disk(tmp_path, LOGICAL.replace("start=3002368, type=82",
                                            "start=3002368, size=2000000, type=82\n"
                                            "start=5004416, type=83"))
    table = read_table(str(image))
    with pytest.raises(PlanError, match="renumber"):
        place(str(image), table, table.number(5), _manifest_small())


def test_too_small_swap_is_refused_with_sizes(tmp_path: Path) -> None:
    image = _disk(tmp_path, PRIMARY, size=3002368 * 512 + (300 << 20))
    table = read_table(str(image))
    with pytest.raises(PlanError, match=r"holds 300 MiB; the flasher's partitions need 509 MiB"):
        place(str(image), table, table.number(2), _manifest_small())
