"""The flasher's systemd units: which of them flash the disk or register the device, and the
edits that leave stage 2 as the only thing that runs.

A balenaOS flasher starts `resin-init-flasher` from resin-init-flasher.service and
registers the device with the API in config.json from resin-device-register.service (both
in /lib/systemd/system, enabled in /etc/systemd/system/multi-user.target.wants/; its mount
units live in /etc/systemd/system). The builder finds them by what they run, not by name,
masks each (a link to /dev/null in /etc/systemd/system, as `systemctl mask` makes it),
installs stage 2's own unit beside the flasher's and enables it, and refuses a flasher in
which it finds no unit running the flasher script or none running the registration: it
would not know what starts on that flasher.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UnsupportedFlasherError, VerifyError
from .fsedit import Ext4Image

ETC_UNITS = "/etc/systemd/system"
#: Where systemd looks for units, highest precedence first (/run is empty offline).
UNIT_DIRS = (ETC_UNITS, "/lib/systemd/system", "/usr/lib/systemd/system")
FLASHER_SCRIPT = "resin-init-flasher"
REGISTER_SCRIPT = "resin-device-register"
STAGE2_UNIT = "resin-migrate-stage2.service"
WANTED_BY = "multi-user.target"
MASK_TARGET = "/dev/null"


@dataclass
class UnitFile:
    name: str
    path: str                      # in the image
    text: str = ""
    link: str | None = None        # when the entry is a symbolic link: its target
    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def masked(self) -> bool:
        return self.link == MASK_TARGET

    def values(self, section: str, key: str) -> list[str]:
        """Every value of key in section, in order (an empty assignment resets the list)."""
        found: list[str] = []
        for name, value in self.sections.get(section, []):
            if name == key:
                found = [] if not value else [*found, value]
        return found

    def runs(self, script: str) -> bool:
        """Whether one of its Exec lines runs a program or script named script."""
        for key in ("ExecStart", "ExecStartPre", "ExecStartPost"):
            for value in self.values("Service", key):
                try:
                    words = shlex.split(value.lstrip("-@:+!"))
                except ValueError:
                    words = value.split()
                if any(os.path.basename(word) == script for word in words):
                    return True
        return False


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections as systemd reads them: comments (# ;) skipped, a line ending
    in a backslash continued on the next, keys kept in order (they may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1].strip(), [])
        elif "=" in line and current is not None:
            key, _, value = line.partition("=")
            current.append((key.strip(), " ".join(value.split())))
    return sections


@dataclass
class FlasherUnits:
    """What the builder found: the units that flash, those that register, and stage 2's."""

    units: dict[str, UnitFile]
    flashers: list[UnitFile]
    registrations: list[UnitFile]

    @property
    def to_mask(self) -> list[UnitFile]:
        return [unit for unit in self.flashers + self.registrations if not unit.masked]


def read_units(rootfs: Ext4Image) -> dict[str, UnitFile]:
    """Every unit file the flasher's systemd would load, by name: the one of the
    highest-precedence directory (an /etc link to /dev/null masks the name)."""
    units: dict[str, UnitFile] = {}
    with tempfile.TemporaryDirectory(prefix="units-") as tmp:
        for directory in UNIT_DIRS:
            if rootfs.entry(directory) is None:
                continue
            dest = Path(tmp) / directory.strip("/").replace("/", "_")
            dest.mkdir()
            rootfs.rdump(directory, dest)
            local = dest / os.path.basename(directory)
            for entry in sorted(local.iterdir()):
                if entry.name in units or not entry.name.endswith((".service", ".mount")):
                    continue
                unit = UnitFile(name=entry.name, path=f"{directory}/{entry.name}")
                if entry.is_symlink():
                    unit.link = os.readlink(entry)
                elif entry.is_file():
                    unit.text = entry.read_text(errors="replace")
                    unit.sections = parse_unit(unit.text)
                else:
                    continue
                units[entry.name] = unit
    # a link elsewhere than /dev/null stands for its target's text
    for unit in units.values():
        if unit.link and not unit.masked:
            target = next((u for u in units.values() if u.path == unit.link), None)
            if target is not None:
                unit.text, unit.sections = target.text, target.sections
    return units


def recognise(units: dict[str, UnitFile], where: str) -> FlasherUnits:
    """The flasher's flashing and registration units; refused when either is missing."""
    flashers = [u for u in units.values() if u.name != STAGE2_UNIT and u.runs(FLASHER_SCRIPT)]
    registrations = [u for u in units.values() if u.runs(REGISTER_SCRIPT)]
    missing = []
    if not flashers and FLASHER_SCRIPT + ".service" not in units:
        missing.append(f"no unit runs {FLASHER_SCRIPT}")
    if not registrations and REGISTER_SCRIPT + ".service" not in units:
        missing.append(f"no unit runs {REGISTER_SCRIPT}")
    if missing:
        seen = ", ".join(sorted(name for name in units if name.startswith(("resin", "balena"))))
        raise UnsupportedFlasherError(
            f"{where}: the flasher's systemd units are not the ones this builder knows "
            f"({'; '.join(missing)}; balena units found: {seen or 'none'}). It cannot tell "
            "what would start when the flasher boots, so it will not repack it; use an "
            "unmodified intel-nuc or genericx86-64-ext flasher")
    # the units of those names are the flasher's own whatever they run: masked too (one
    # already masked in /etc stays masked)
    for name, found in ((FLASHER_SCRIPT + ".service", flashers),
                        (REGISTER_SCRIPT + ".service", registrations)):
        unit = units.get(name)
        if unit is not None and unit not in found:
            found.append(unit)
    return FlasherUnits(units=units, flashers=flashers, registrations=registrations)


def install(rootfs: Ext4Image, found: FlasherUnits, stage2_unit: Path, epoch: int
            ) -> list[str]:
    """Mask the flashing and registration units, install and enable stage 2's unit beside
    the flasher's; return what was done, in words."""
    edits = []
    for unit in found.to_mask:
        mask = f"{ETC_UNITS}/{unit.name}"
        if rootfs.entry(mask) is not None:
            rootfs.remove(mask)
        rootfs.symlink(mask, MASK_TARGET, epoch)
        edits.append(f"masked {unit.name} (it ran {_script_of(unit)})")
    unit_dir = _unit_dir(found)
    path = f"{unit_dir}/{STAGE2_UNIT}"
    rootfs.put_file(stage2_unit, path, 0o644, 0, 0, epoch)
    wants = f"{ETC_UNITS}/{WANTED_BY}.wants"
    if rootfs.entry(wants) is None:
        rootfs.mkdir(wants, epoch)
    link = f"{wants}/{STAGE2_UNIT}"
    if rootfs.entry(link) is not None:
        rootfs.remove(link)
    rootfs.symlink(link, path, epoch)
    for directory in (ETC_UNITS, wants, unit_dir):
        rootfs.touch_dir(directory, epoch)
    edits.append(f"installed {path}, enabled in {wants}")
    return edits


def _unit_dir(found: FlasherUnits) -> str:
    """Where the flasher's own unit file lives (Yocto's systemd_unitdir); /lib/systemd/system
    when its only trace is a mask in /etc."""
    for unit in found.flashers:
        if not unit.path.startswith(ETC_UNITS):
            return os.path.dirname(unit.path)
    return "/lib/systemd/system"


def verify(rootfs: Ext4Image, found: FlasherUnits, stage2_unit: Path) -> None:
    """Read the units back from the filesystem: every flashing and registration unit
    masked, stage 2's unit present with the right bytes and enabled."""
    units = read_units(rootfs)
    problems = []
    for unit in found.flashers + found.registrations:
        now = units.get(unit.name)
        if now is None or not now.masked:
            problems.append(f"{unit.name} is not masked")
    mine = units.get(STAGE2_UNIT)
    if mine is None or mine.text != stage2_unit.read_text():
        problems.append(f"{STAGE2_UNIT} does not read back as installed")
    wants = f"{ETC_UNITS}/{WANTED_BY}.wants/{STAGE2_UNIT}"
    target = rootfs.readlink(wants)
    if mine is None or target != mine.path:
        problems.append(f"{wants} points to {target!r}, not to the stage 2 unit")
    if problems:
        raise VerifyError(f"{rootfs.name}: the unit edits did not take: {'; '.join(problems)}")


def _script_of(unit: UnitFile) -> str:
    return FLASHER_SCRIPT if unit.runs(FLASHER_SCRIPT) or unit.name.startswith(
        FLASHER_SCRIPT) else REGISTER_SCRIPT
