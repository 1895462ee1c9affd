"""stage2.env: what stage 2 needs from the manifest and stage 1, as shell assignments.

Stage 2 sources this file, so every value is checked against a strict pattern here,
whatever was checked before, and rendered in single quotes (no pattern admits one).
"""

import re

from .backup import room as backup_room
from .errors import MigrateError

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import List, Tuple  # noqa: F401  # novermin

FORMAT = 4    # 4: RM_BACKUP_ROOM
PATTERNS = {
    "count": re.compile(r"^[0-9]{1,20}$"),
    "sha256": re.compile(r"^[0-9a-f]{64}$"),
    "path": re.compile(r"^(/[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}){1,16}$"),
    "word": re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"),
    # START:LENGTH:SHA256,... (bytes)
    "extents": re.compile(r"^[0-9]{1,20}:[0-9]{1,20}:[0-9a-f]{64}"
                          r"(,[0-9]{1,20}:[0-9]{1,20}:[0-9a-f]{64})*$"),
}


class RenderError(MigrateError):
    exit_code = 3


def render(values):
    # type: (List[Tuple[str, str, object]]) -> str
    """values: (NAME, kind, value); kind names the pattern the value must match."""
    lines = ["# resin-migrate stage 2 inputs, written by stage 1. Sourced by bash."]
    for name, kind, value in values:
        text = str(value)
        if not re.match(r"^RM_[A-Z0-9_]+$", name) or not PATTERNS[kind].match(text):
            raise RenderError("stage 2 input {}={!r} does not match the {} pattern {}".format(
                name, text, kind, PATTERNS[kind].pattern))
        lines.append("{}='{}'".format(name, text))
    return "\n".join(lines) + "\n"


def stage2_values(manifest, layout, disk_sectors, backup_size, backup_sha256, core,
                  guard_timeout):
    """The inputs stage 2 reads, from the manifest, the placement of the flash partitions and
    what stage 1 wrote for the flasher's own boot (core: a dict with core_start,
    core_sectors, core_sha256 and armed_mbr_sha256, as the state file holds them)."""
    inner = manifest.inner_image
    image_layout = inner.layout
    boot = image_layout.by_label("resin-boot")
    data = image_layout.by_label("resin-data")
    values = [
        ("RM_FORMAT", "count", FORMAT),
        ("RM_IMAGE_PATH", "path", inner.path),
        ("RM_IMAGE_COMPRESSION", "word", inner.compression),
        ("RM_IMAGE_SIZE", "count", inner.size),
        ("RM_IMAGE_SHA256", "sha256", inner.sha256),
        ("RM_IMAGE_RAW_SIZE", "count", inner.raw_size),
        ("RM_IMAGE_RAW_SHA256", "sha256", inner.raw_sha256),
        ("RM_IMAGE_STREAM_SIZE", "count", inner.stream_size),
        ("RM_IMAGE_STREAM_SHA256", "sha256", inner.stream_sha256),
        ("RM_IMAGE_EXTENTS", "extents",
         ",".join("{}:{}:{}".format(start, length, digest)
                  for start, length, digest in inner.extents)),
        ("RM_IMAGE_SECTOR_SIZE", "count", image_layout.sector_size),
        ("RM_IMAGE_BOOT_START", "count", boot.start),
        ("RM_IMAGE_BOOT_SIZE", "count", boot.size),
        ("RM_IMAGE_DATA_NUMBER", "count", data.number),
        ("RM_IMAGE_DATA_START", "count", data.start),
        ("RM_IMAGE_DATA_SIZE", "count", data.size),
        ("RM_FLASH_START", "count", layout.protected_start),
        ("RM_DISK_SECTORS", "count", disk_sectors),
        ("RM_BACKUP_SIZE", "count", backup_size),
        # what resin-data of the image has room for: stage 2 checks the backup against it
        # again before its point of no return (the builder measured the image's free space)
        ("RM_BACKUP_ROOM", "count", backup_room(manifest)),
        ("RM_CORE_START", "count", core["core_start"]),
        ("RM_CORE_SECTORS", "count", core["core_sectors"]),
        ("RM_CORE_SHA256", "sha256", core["core_sha256"]),
        ("RM_ARMED_MBR_SHA256", "sha256", core["armed_mbr_sha256"]),
        ("RM_GUARD_TIMEOUT", "count", guard_timeout),
    ]
    if backup_sha256:
        values.append(("RM_BACKUP_SHA256", "sha256", backup_sha256))
    return values
