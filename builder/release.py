"""Which release a flasher is, read from its version files, and what that release's shape is.

The release is os-release's VERSION in flash-rootA: the host OS version, the board repo's
tag (meta-balena sets VERSION = HOSTOS_VERSION in every release; VERSION_ID is the same only
from v2.38.0, 40347f618: before, it is poky's DISTRO_VERSION, meta-resin's version without
the board's +revN, so "2.12.7" in a 2.12.7+rev2 flasher). META_BALENA_VERSION, where present,
is the meta-balena version it was built from; the machine is os-release's MACHINE, the
device type device-type.json's slug on flash-boot. The shape is the newest row of SHAPES
the release has reached: what a flasher of that release holds that the builder must handle.
The builder acts on what it finds in the image; the shape says what it expected to find and
goes into the manifest.

Boundaries (meta-balena mb, balena-intel bi; see REFERENCE.md and tests/releases.py for the
files they were read from).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .errors import FlasherLayoutError, UnsupportedFlasherError

#: Machines whose flasher is an msdos, legacy-BIOS-capable intel-nuc style image.
MACHINES = ("genericx86-64", "genericx86-64-ext", "intel-corei7-64")


@dataclass(frozen=True)
class Shape:
    name: str
    since: tuple[int, ...]
    what: str


SHAPES = (
    Shape("2.0", (2, 0, 0), "kernel /vmlinuz on flash-boot, resin names, flash-boot mounted "
                            "read-write at /mnt/bootorig; the image needs the flasher's "
                            "boot code and grub.cfg"),
    Shape("2.21", (2, 21, 0, 1), "kernel /boot/bzImage in flash-rootA; the image boots a "
                                 "legacy BIOS by itself (bi v2.21.0+rev1)"),
    Shape("2.34", (2, 34, 1, 3), "`flasher` on the kernel line (bi v2.34.1+rev3)"),
    Shape("2.51", (2, 51, 1, 5), "grub_extraenv and ${extra_os_cmdline} (bi v2.51.1+rev5)"),
    Shape("2.72", (2, 72, 0), "balena names: /balena-image-flasher, .balenaos-img "
                              "(mb v2.72.0)"),
    Shape("2.91", (2, 91, 6), "the flasher waits for device registration (mb v2.91.6)"),
    Shape("2.108", (2, 108, 4), "console=null quiet splash on the kernel line (mb v2.108.4)"),
    Shape("2.113", (2, 113, 0), "the initramfs migrator takes over a flasher booted from the "
                                "only disk (mb v2.113.0)"),
    Shape("3.1", (3, 1, 6), "the flasher no longer waits for registration (mb v3.1.6)"),
    Shape("6.8", (6, 8, 5), "${extra_os_firmware_class_path} (mb v6.8.5)"),
    Shape("8.0", (8, 0, 0), "100 MiB boot partitions (mb v8.0.0)"),
)

_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(?:\+rev(\d+))?")


@dataclass(frozen=True)
class FlasherRelease:
    release: str            # os-release VERSION, e.g. "2.113.34" or "2.12.7+rev2"
    meta_balena: str | None
    machine: str
    slug: str
    shape: Shape

    def describe(self) -> str:
        return (f"balenaOS {self.release} ({self.machine}, device type {self.slug}): "
                f"shape {self.shape.name}, {self.shape.what}")


def version_key(text: str) -> tuple[int, ...] | None:
    """(major, minor, patch, rev) of "2.51.1+rev5" or "v6.10.24"; None when it is not one."""
    match = _VERSION.match(text.strip())
    if not match:
        return None
    return tuple(int(part) for part in match.groups(default="0"))


def parse_os_release(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and re.match(r"^[A-Z_][A-Z0-9_]*$", key.strip()):
            fields[key.strip()] = value.strip().strip('"').strip("'")
    return fields


def recognise(os_release: str | None, device_type: bytes | None, where: str
              ) -> FlasherRelease:
    """The flasher's release from flash-rootA's /etc/os-release and flash-boot's
    device-type.json; refused when either is missing or names what this tool cannot
    migrate to."""
    if os_release is None:
        raise FlasherLayoutError(f"{where}: flash-rootA has no /etc/os-release, so its release "
                                 "cannot be told; use an unmodified balenaOS flasher image")
    fields = parse_os_release(os_release)
    # VERSION first: the board's version, whose +revN the boundaries need (see above)
    field = next((name for name in ("VERSION", "VERSION_ID")
                  if version_key(fields.get(name, ""))), "VERSION")
    found = _VERSION.match(fields.get(field, "").strip())
    if found is None:
        raise FlasherLayoutError(f"{where}: /etc/os-release says {field}="
                                 f"{fields.get(field, '')!r}, not a balenaOS version; use an "
                                 "unmodified flasher image")
    release = found.group(0).removeprefix("v")  # the version only, whatever follows it
    key = tuple(int(part) for part in found.groups(default="0"))
    machine = fields.get("MACHINE", "")
    if machine == "generic-amd64" or machine.startswith("generic-"):
        raise UnsupportedFlasherError(
            f"{where}: balenaOS {release} for {machine} (balena-generic) is a GPT, EFI-only, "
            "signed image: resin-migrate moves legacy-BIOS msdos devices and would have to "
            "re-sign it. Download the intel-nuc or genericx86-64-ext flasher instead")
    if machine not in MACHINES:
        raise UnsupportedFlasherError(
            f"{where}: balenaOS {release} for the machine {machine or '(none)'}; resin-migrate "
            f"repacks the x86 flashers ({', '.join(MACHINES)}): download the intel-nuc or "
            "genericx86-64-ext flasher")
    if key < (2, 0, 0):
        raise UnsupportedFlasherError(
            f"{where}: resinOS {release} is a 1.x release, whose images have another layout; "
            "resin-migrate needs a 2.x or later flasher")
    slug = _slug(device_type, where)
    shape = [shape for shape in SHAPES if shape.since <= key][-1]
    meta = fields.get("META_BALENA_VERSION") or None
    return FlasherRelease(release=release, meta_balena=meta, machine=machine, slug=slug,
                          shape=shape)


def _slug(device_type: bytes | None, where: str) -> str:
    if device_type is None:
        raise FlasherLayoutError(f"{where}: flash-boot has no device-type.json (every flasher "
                                 "since resinOS 1.12 has one); use an unmodified flasher image")
    try:
        slug = json.loads(device_type.decode("utf-8")).get("slug")
    except (UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise FlasherLayoutError(f"{where}: flash-boot's device-type.json is not valid JSON "
                                 f"({exc})") from exc
    if not isinstance(slug, str) or not re.match(r"^[a-z0-9][a-z0-9._-]{0,63}$", slug):
        raise FlasherLayoutError(f"{where}: flash-boot's device-type.json has no usable "
                                 f"slug ({slug!r})")
    return slug
