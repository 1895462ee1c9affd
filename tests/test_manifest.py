"""manifest.json: the schema the builder writes and the runtime reads."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from runtime.errors import ManifestError
from runtime.layout import Layout
from runtime.manifest import (
    SCHEMA_VERSION,
    Boot,
    DevicePartition,
    Flasher,
    InnerImage,
    Manifest,
    Source,
    Stream,
    dumps,
    loads,
)

SHA = "ab" * 32
# layouts/resinos-image.json as builder.layout.ReferenceLayout reads it, without the
# builder: these tests also run on the runtime's old Pythons (tasks.py)
RESINOS_LAYOUT = Path(__file__).resolve().parent.parent / "layouts" / "resinos-image.json"


def _manifest() -> Manifest:
    return Manifest(
        schema=SCHEMA_VERSION, builder_version="0.1.0",
        source=Source(name="flasher.img.zip", format="zip", sha256=SHA),
        partitions=[
            DevicePartition(label="flash-boot", fs="vfat", size=40 << 20, flags=["boot", "lba"],
                            grows=False, stream="flash-boot.gz"),
            DevicePartition(label="flash-rootA", fs="ext4", size=400 << 20, flags=[],
                            grows=False, stream="flash-rootA.gz"),
            DevicePartition(label="flash-data", fs="ext4", size=64 << 20, flags=[], grows=True,
                            stream=None),
        ],
        streams=[Stream(file="flash-boot.gz", compression="gzip", size=100, sha256=SHA,
                        raw_size=40 << 20, raw_sha256=SHA),
                 Stream(file="flash-rootA.gz", compression="gzip", size=100, sha256=SHA,
                        raw_size=400 << 20, raw_sha256=SHA),
                 Stream(file="kernel-fs-probe.gz", compression="gzip", size=100, sha256=SHA,
                        raw_size=16 << 20, raw_sha256=SHA)],
        inner_image=InnerImage(
            path="/opt/resin-image-genericx86-64.resinos-img.zst",
            original_path="/opt/resin-image-genericx86-64.resinos-img", compression="zstd",
            size=300 << 20, sha256=SHA, raw_size=1800 << 20, raw_sha256=SHA,
            stream_size=504 << 20, stream_sha256=SHA,
            extents=[[0, 4 << 20, SHA], [4 << 20, 100 << 20, SHA], [400 << 20, 400 << 20, SHA]],
            layout=Layout.from_dict(json.loads(RESINOS_LAYOUT.read_text(encoding="utf-8"))
                                    ["layout"], str(RESINOS_LAYOUT)), data_free=850 << 20),
        boot=Boot(kernel_label="flash-rootA", kernel="/boot/bzImage", initrd=None,
                  cmdline="root=LABEL=flash-rootA flasher rootwait vt.global_cursor_default=0 "
                          "console=ttyS0,115200n8 console=tty0 panic=10",
                  dropped_args=["console=null", "quiet", "splash", "${extra_os_cmdline}"],
                  added_args=["console=ttyS0,115200n8", "console=tty0", "panic=10"],
                  kernel_size=9 << 20, kernel_sha256=SHA, probe="kernel-fs-probe.gz",
                  probe_sha256=SHA),
        flasher=Flasher(release="2.113.34", meta_balena="2.113.35", machine="genericx86-64",
                        slug="intel-nuc", shape="2.113", flag_file="/balena-image-flasher",
                        edits=["masked resin-init-flasher.service (it ran resin-init-flasher)",
                               "removed /flash-boot/balena-image-flasher from flash-rootA"]),
        flasher_decompressors=["gzip", "zstd"],
        network_files=["office-wifi"],
    )


def test_round_trip_is_stable() -> None:
    data = dumps(_manifest())
    assert loads(data) == _manifest()
    assert dumps(loads(data)) == data


@pytest.mark.parametrize(("path", "value", "message"), [
    (("partitions", 0, "label"), "flash-boot;reboot", r"partitions\[0\]\.label"),
    (("boot", "cmdline"), "root=LABEL=flash-rootA $(reboot)", r"boot\.cmdline"),
    (("boot", "kernel"), "/../../etc/shadow", r"boot\.kernel"),
    (("streams", 1, "sha256"), "not-a-hash", r"streams\[1\]\.sha256"),
    (("streams", 0, "file"), "../flash-boot.gz", r"streams\[0\]\.file"),
    (("inner_image", "compression"), "lz4", r"inner_image\.compression"),
    (("partitions", 2, "grows"), "yes", r"partitions\[2\]\.grows"),
    (("inner_image", "layout", "partitions", 0, "label"), "a b", r"layout\.partitions\[0\]"),
    (("boot", "added_args", 0), "console=tty0;reboot", r"boot\.added_args\[0\]"),
    (("boot", "dropped_args", 1), "$(reboot)", r"boot\.dropped_args\[1\]"),
    (("boot", "dropped_args"), "quiet", r"boot\.dropped_args: expected a list"),
    (("flasher", "release"), "2.113.34; reboot", r"flasher\.release"),
    (("flasher", "machine"), "Generic AMD64", r"flasher\.machine"),
    (("flasher", "flag_file"), "../balena-image-flasher", r"flasher\.flag_file"),
    (("flasher", "edits", 0), "masked `reboot`", r"flasher\.edits\[0\]"),
])
def test_bad_values_are_refused_naming_the_field(path, value, message) -> None:
    data = json.loads(dumps(_manifest()))
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ManifestError, match=message):
        loads(json.dumps(data).encode())


def test_cross_field_rules() -> None:
    data = json.loads(dumps(_manifest()))
    unknown_stream = copy.deepcopy(data)
    unknown_stream["partitions"][0]["stream"] = "missing.gz"
    with pytest.raises(ManifestError, match="missing.gz, which is not in streams"):
        loads(json.dumps(unknown_stream).encode())
    two_grow = copy.deepcopy(data)
    two_grow["partitions"][1]["grows"] = True
    with pytest.raises(ManifestError, match="exactly one partition must grow"):
        loads(json.dumps(two_grow).encode())
    too_big = copy.deepcopy(data)
    too_big["streams"][1]["raw_size"] = (400 << 20) + 1
    with pytest.raises(ManifestError, match="larger than the partition"):
        loads(json.dumps(too_big).encode())
    no_probe = copy.deepcopy(data)
    no_probe["streams"].pop()
    with pytest.raises(ManifestError, match=r"boot\.probe: kernel-fs-probe.gz is not in"):
        loads(json.dumps(no_probe).encode())
    undecodable = copy.deepcopy(data)
    undecodable["flasher_decompressors"] = ["gzip"]
    with pytest.raises(ManifestError, match="flasher cannot decompress"):
        loads(json.dumps(undecodable).encode())


def test_other_schema_versions_and_broken_json_are_refused() -> None:
    data = json.loads(dumps(_manifest()))
    data["schema"] = SCHEMA_VERSION + 1
    with pytest.raises(ManifestError, match="schema version"):
        loads(json.dumps(data).encode())
    with pytest.raises(ManifestError, match="not valid JSON"):
        loads(b'{"schema": 1,')
    data["schema"] = SCHEMA_VERSION
    for record in ("boot", "flasher"):
        partial = copy.deepcopy(data)
        del partial[record]
        with pytest.raises(ManifestError, match=f"'{record}' is missing"):
            loads(json.dumps(partial).encode())
    # a schema 2 manifest (no flasher record, no dropped/added arguments) is not read as 3
    del data["flasher"]
    data["schema"] = 2
    with pytest.raises(ManifestError, match="schema version"):
        loads(json.dumps(data).encode())
