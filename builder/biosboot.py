"""Whether the resinOS image inside the flasher boots a legacy BIOS from its own bytes, and
the completion the real flasher's post-steps would make when it does not.

From balena-intel v2.21.0+rev1 the image carries GRUB's boot.img in its MBR, core.img from
sector 1 and /grub/grub.cfg on resin-boot. Earlier images left that to the flasher:
resin-init-flasher copied grub.cfg_internal to /grub/grub.cfg, and (balena-intel v2.9.7+rev2
to v2.15.0) resin-init-flasher-board wrote /grub/boot.img to the MBR and /grub/core.img after
it; before v2.9.2+rev1 the image is EFI only. The builder looks at the image itself rather
than trusting a version string: it finds GRUB's boot code by the messages boot.img and
diskboot.img (core.img's first sector) carry, and /grub/grub.cfg on resin-boot. What is
missing it writes into the image before the block map is made, from the image's own
/grub files (else flash-boot's), so stage 2 writes a complete, hashed image and has nothing
to finish after its point of no return. An image with no GRUB for a BIOS at all is refused.

core.img holds only `biosdisk part_msdos fat search linux` (balena-intel grub_%.bbappend,
GRUB_BUILDIN, every release) and loads the rest, normal mode first, from its prefix, /grub
on resin-boot: an image whose resin-boot has no /grub/i386-pc stops at GRUB's rescue prompt
whatever boot code it is given, so it counts as EFI only even when flash-boot has a BIOS
GRUB (the flasher itself may boot by BIOS).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runtime.layout import Layout

from .errors import UnsupportedFlasherError, VerifyError
from .formats import extract_range
from .fsedit import FatImage
from .progress import Progress

SECTOR = 512
BOOT_CODE = 440               # MBR bytes 0..439: boot code; 440.. disk id and table
BOOT_IMG_MESSAGE = b"GRUB "   # boot.img: "GRUB \0Geom\0Hard Disk\0Read\0 Error"
DISKBOOT_MESSAGE = b"loading"  # diskboot.img, the first sector of core.img
GRUB_CFG = "/grub/grub.cfg"
GRUB_FILES = ("/grub/boot.img", "/grub/core.img")
#: What core.img loads first from its prefix (normal mode: menus, grub.cfg).
GRUB_NORMAL = "/grub/i386-pc/normal.mod"


@dataclass(frozen=True)
class BiosBoot:
    """What the image holds of GRUB for a legacy BIOS."""

    boot_code: bool     # boot.img in the MBR
    core_img: bool      # core.img from sector 1
    grub_cfg: bool      # /grub/grub.cfg on resin-boot, as grub.cfg_internal has it
    modules: bool       # /grub/i386-pc on resin-boot, where core.img finds normal mode

    @property
    def complete(self) -> bool:
        return self.boot_code and self.core_img and self.grub_cfg and self.modules


def _head(image: Path) -> bytes:
    with image.open("rb") as handle:
        return handle.read(2 * SECTOR)


def _inspect(image: Path, boot: FatImage, internal_cfg: bytes | None) -> BiosBoot:
    head = _head(image)
    cfg_ok = boot.exists(GRUB_CFG) and (internal_cfg is None or
                                        boot.read(GRUB_CFG) == internal_cfg)
    return BiosBoot(boot_code=BOOT_IMG_MESSAGE in head[:BOOT_CODE],
                    core_img=DISKBOOT_MESSAGE in head[SECTOR:2 * SECTOR],
                    grub_cfg=cfg_ok, modules=boot.exists(GRUB_NORMAL))


def complete_image(image: Path, layout: Layout, flash_boot: FatImage, work: Path,
                   progress: Progress, where: str) -> list[str]:
    """Make the image at path boot a legacy BIOS as the real flasher would leave it; return
    what was written, in words (nothing for an image that needs nothing)."""
    boot_part = layout.by_label("resin-boot")
    offset = boot_part.start * layout.sector_size
    size = boot_part.size * layout.sector_size
    boot_copy = work / "resin-boot.img"
    extract_range(image, offset, size, boot_copy, progress, "reading resin-boot")
    boot = FatImage(boot_copy, flash_boot.epoch, name=f"{where}:resin-boot")
    internal = flash_boot.read("/grub.cfg_internal") if flash_boot.exists(
        "/grub.cfg_internal") else None
    found = _inspect(image, boot, internal)
    edits: list[str] = []
    if found.complete:
        boot_copy.unlink()
        return edits
    if not found.modules:
        # neither boot code nor a grub.cfg would help: GRUB could not leave its rescue mode
        raise UnsupportedFlasherError(
            f"{where}: the resinOS image boots by EFI only: its resin-boot has no GRUB "
            f"modules for a legacy BIOS ({GRUB_NORMAL}, which core.img loads from /grub)"
            + ("" if found.boot_code else ", and its first sectors hold no GRUB boot code")
            + " (releases before balena-intel v2.9.2+rev1). resin-migrate moves "
            "legacy-BIOS devices: use a newer flasher")
    if not (found.boot_code and found.core_img):
        source = boot if all(boot.exists(path) for path in GRUB_FILES) else flash_boot
        origin = "the image's resin-boot" if source is boot else "flash-boot"
        if not all(source.exists(path) for path in GRUB_FILES):
            raise UnsupportedFlasherError(
                f"{where}: the resinOS image has no GRUB boot code for a legacy BIOS in its "
                "first sectors, and neither its resin-boot nor flash-boot has /grub/boot.img "
                "and core.img to put there, so it would not boot after the write. "
                "resin-migrate moves legacy-BIOS devices: use an unmodified flasher of "
                "balena-intel v2.9.2+rev1 or later")
        boot_img, core_img = (source.read(path) for path in GRUB_FILES)
        first = min(part.start for part in layout.partitions) * layout.sector_size
        if len(boot_img) < BOOT_CODE or SECTOR + len(core_img) > first:
            raise UnsupportedFlasherError(
                f"{where}: the GRUB of {origin} does not fit before the image's first "
                f"partition (boot.img {len(boot_img)} bytes, core.img {len(core_img)} bytes, "
                f"{first} bytes free)")
        with image.open("r+b") as handle:
            handle.write(boot_img[:BOOT_CODE])
            handle.seek(SECTOR)
            handle.write(core_img)
        edits.append(f"wrote GRUB's boot.img and core.img from /grub on {origin} into the "
                     "image's first sectors, as the flasher's board script would")
    if not found.grub_cfg:
        if internal is None:
            raise UnsupportedFlasherError(
                f"{where}: the resinOS image has no {GRUB_CFG} on resin-boot and flash-boot "
                "has no grub.cfg_internal to put there: it would not boot after the write")
        boot.mkdir("/grub")
        boot.put(internal, GRUB_CFG)
        boot.check()
        with boot_copy.open("rb") as source_fs, image.open("r+b") as target:
            target.seek(offset)
            while chunk := source_fs.read(1 << 20):
                target.write(chunk)
        edits.append(f"copied flash-boot's grub.cfg_internal to {GRUB_CFG} on the image's "
                     "resin-boot, as the flasher would")
    again = _inspect(image, boot, internal)
    boot_copy.unlink()
    if not again.complete:
        raise VerifyError(f"{where}: after completing it the image still lacks GRUB for a "
                          f"legacy BIOS ({again})")
    return edits
