"""Telling a flasher's release and its units from the files the image carries (no image
needed: the texts are those the release rows and meta-balena's recipes give)."""

from __future__ import annotations

import pytest

from builder.errors import FlasherLayoutError, UnsupportedFlasherError
from builder.release import recognise
from builder.units import UnitFile, parse_unit
from builder.units import recognise as recognise_units
from tests.releases import RELEASES, Release, device_type_json, flasher_units, os_release

NUC = RELEASES["6.10"]


@pytest.mark.parametrize("release", list(RELEASES.values()), ids=list(RELEASES))
def test_every_row_is_recognised(release: Release) -> None:
    found = recognise(os_release(release).decode(), device_type_json(release), "flasher.img")
    assert (found.release, found.machine, found.slug) == (
        release.version, release.machine, release.slug)
    assert found.meta_balena == (release.meta_balena or None)


def _os_release(**fields: str) -> str:
    return "".join(f'{key}="{value}"\n' for key, value in fields.items())


@pytest.mark.parametrize(("version", "version_id", "shape"), [
    # before meta-balena v2.38.0 (40347f618) VERSION_ID is meta-resin's DISTRO_VERSION,
    # without the board's +revN; VERSION is the board's version in every release
    ("2.12.7+rev2", "2.12.7", "2.0"),
    ("2.21.0+rev1", "2.21.0", "2.21"),
    ("2.34.1+rev3", "2.34.1", "2.34"),
    ("2.51.1+rev5", "2.51.1+rev5", "2.51"),
    ("2.113.34", "2.113.34", "2.113"),
])
def test_the_board_version_decides_the_shape(version: str, version_id: str, shape: str) -> None:
    text = _os_release(ID="resin-os", VERSION=version, VERSION_ID=version_id,
                       MACHINE="genericx86-64")
    found = recognise(text, device_type_json(NUC), "flasher.img")
    assert (found.release, found.shape.name) == (version, shape)


@pytest.mark.parametrize(("fields", "device_type", "error", "message"), [
    (None, True, FlasherLayoutError, "no /etc/os-release"),
    ({"VERSION": "latest", "MACHINE": "genericx86-64"}, True, FlasherLayoutError,
     "VERSION='latest', not a balenaOS version"),
    ({"VERSION": "6.10.24", "MACHINE": "generic-amd64"}, True, UnsupportedFlasherError,
     r"generic-amd64 \(balena-generic\)"),
    ({"VERSION": "6.10.24", "MACHINE": "raspberrypi4-64"}, True, UnsupportedFlasherError,
     "the machine raspberrypi4-64"),
    ({"VERSION": "1.30.1", "MACHINE": "intel-corei7-64"}, True, UnsupportedFlasherError,
     "1.x release"),
    ({"VERSION": "6.10.24", "MACHINE": "genericx86-64"}, False, FlasherLayoutError,
     "no device-type.json"),
], ids=["no-os-release", "not-a-version", "generic-amd64", "other-machine", "release-1.x",
        "no-device-type"])
def test_what_is_not_a_known_flasher_is_refused(fields, device_type, error, message) -> None:
    text = None if fields is None else _os_release(**fields)
    with pytest.raises(error, match=message):
        recognise(text, device_type_json(NUC) if device_type else None, "flasher.img")


def _units(release: Release) -> dict[str, UnitFile]:
    units = {}
    for unit in flasher_units(release):
        text = unit.text()
        units[unit.name] = UnitFile(name=unit.name, path=unit.path, text=text,
                                    sections=parse_unit(text))
    return units


@pytest.mark.parametrize("release", list(RELEASES.values()), ids=list(RELEASES))
def test_the_flashing_and_registration_units_are_found(release: Release) -> None:
    found = recognise_units(_units(release), "flasher.img:flash-rootA")
    assert [unit.name for unit in found.to_mask] == [
        "resin-init-flasher.service", "resin-device-register.service"]


def test_a_unit_named_for_the_flasher_is_masked_whatever_it_runs() -> None:
    units = _units(NUC)
    renamed = units["resin-init-flasher.service"]
    renamed.text = renamed.text.replace("/usr/bin/resin-init-flasher", "/usr/bin/flash-it")
    renamed.sections = parse_unit(renamed.text)
    units["flash-it.service"] = UnitFile(
        name="flash-it.service", path="/lib/systemd/system/flash-it.service",
        text=units["resin-device-register.service"].text.replace(
            "resin-device-register", "resin-init-flasher"))
    units["flash-it.service"].sections = parse_unit(units["flash-it.service"].text)
    found = recognise_units(units, "flasher.img:flash-rootA")
    assert sorted(unit.name for unit in found.to_mask) == [
        "flash-it.service", "resin-device-register.service", "resin-init-flasher.service"]


def test_a_flasher_without_its_flashing_unit_is_refused() -> None:
    units = _units(NUC)
    del units["resin-init-flasher.service"]
    with pytest.raises(UnsupportedFlasherError, match="no unit runs resin-init-flasher"):
        recognise_units(units, "flasher.img:flash-rootA")
