"""The config.json resinOS gets: the fleet's (--config) or the flasher's own, checked against
the flasher's device type, without its `installer` section.

The real flasher writes `jq 'del(.installer)'` of its config.json to the new resin-boot
(meta-balena resin-init-flasher); the installer section steers the flasher itself
(`installer.migrate.force` makes the initramfs migrator take over), never the installed
OS. The builder removes it once, on flash-boot, so stage 2 copies the file as it is.
"""

from __future__ import annotations

import json

from .errors import FlasherLayoutError, OptionError

INSTALLER_KEY = "installer"


def parse(data: bytes, where: str) -> dict:
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise OptionError(f"{where}: not valid JSON ({exc}); give the config.json downloaded "
                          "for the fleet") from exc
    if not isinstance(parsed, dict):
        raise OptionError(f"{where}: expected a JSON object, found {type(parsed).__name__}")
    return parsed


def for_resinos(data: bytes, slug: str, where: str, fleet: bool) -> tuple[bytes, list[str]]:
    """(the bytes to put on flash-boot, what was changed): refused when its deviceType is
    not the flasher's; the installer section removed (the rest of the file unchanged when
    there is none, else written as jq writes it: two-space indent, UTF-8)."""
    config = parse(data, where)
    device_type = config.get("deviceType")
    error = OptionError if fleet else FlasherLayoutError
    if device_type is None:
        raise error(f"{where}: no deviceType; give the config.json downloaded for a fleet of "
                    f"{slug} devices")
    if device_type != slug:
        raise error(f"{where}: deviceType {device_type!r}, but this flasher is for {slug!r} "
                    f"(its device-type.json): resinOS would not match the fleet. Download the "
                    f"{device_type} flasher, or the config.json of a fleet of {slug} devices")
    if INSTALLER_KEY not in config:
        return data, []
    del config[INSTALLER_KEY]
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    return text.encode("utf-8"), ["config.json: its installer section removed, as the "
                                  "flasher removes it"]
