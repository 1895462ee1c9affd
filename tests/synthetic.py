"""Rootless, deterministic builders of the synthetic flasher matrix: for each row of
``tests.releases`` an intel-nuc / genericx86-64-ext flasher and the resinOS image inside it.

The images have the shape of the real ones wherever the tool could notice it (REFERENCE.md,
and the sources ``tests.releases`` cites): msdos table with 4 MiB alignment, the partition
numbers, types, flags, labels and sizes; FAT16 and ext4 where the real images have them; the
file names of each release (flag files, inner image, kernel, grub configs on flash-boot at
``/grub/grub.cfg`` and ``/EFI/BOOT/grub.cfg``, grub_extraenv, device-type.json, splash,
system-connections, system-proxy, grub.cfg_internal, the rootfs copy of flash-boot that
triggers the initramfs migrator); the flasher's systemd units of that release where Yocto
installs and enables them; GRUB's real boot.img and a core.img made by this host's
grub-mkimage in the images that boot a legacy BIOS. The contents are small pseudo-random or
text-like stand-ins, so a build takes seconds; the large partitions are sparse.

No root, no loop devices, no mounts (``tests.imaging``: sfdisk on a file, ``mkfs.ext4 -d``,
debugfs, ``mkfs.fat`` and mtools). Building twice gives byte-identical files.

``python3 -m tests.synthetic OUT_PATH [--release ROW]`` writes a flasher by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tests import imaging
from tests.imaging import (
    ALIGN,
    SECTOR,
    TYPE_FAT16_LBA,
    TYPE_LINUX,
    CommandError,
    ImageError,
    KiB,
    MiB,
    Tree,
    cache_dir,
)
from tests.releases import (
    DEFAULT,
    RELEASES,
    Release,
    device_type_json,
    external_grub_cfg,
    flasher_conf,
    flasher_units,
    grubenv_block,
    internal_grub_cfg,
    os_release,
)

__all__ = [
    "FlasherSpec",
    "Extras",
    "Grub",
    "host_grub",
    "SOURCES",
    "ImageError",
    "CommandError",
    "FLAG_TEXT",
    "build_resinos_image",
    "build_flasher_image",
    "cached_flasher",
    "cached_resinos",
    "cache_dir",
    "flash_boot_files",
    "flasher_rootfs",
]

#: The content of both flag files (classes/image-balena.bbclass).
FLAG_TEXT = b"DO NOT REMOVE THIS FILE\n"
#: GRUB modules copied to /grub/i386-pc on the boot partitions (a sample: the tool only
#: looks for the directory).
GRUB_MODULE_SAMPLE = ("normal.mod", "linux.mod", "ext2.mod", "fat.mod", "part_msdos.mod",
                      "search_label.mod", "configfile.mod", "command.lst", "moddep.lst")
#: The flasher's partitions after flash-rootA (sizes of the real image).
_FLASH_ROOTB_SIZE = 4 * MiB
_FLASH_STATE_SIZE = 4 * MiB
_FLASH_DATA_SIZE = 8 * MiB
_FLASH_KERNEL_SIZE = 2 * MiB
_ROOTA_FREE_FACTOR = 1.4  # contents plus ~40 % free, like an unmodified flasher
_ROOTA_OVERHEAD = 16 * MiB  # journal, inode tables, directories


@dataclasses.dataclass(frozen=True)
class FlasherSpec:
    """A flasher of one release row, with the knobs the refusal tests need."""

    release: Release = DEFAULT
    with_zstd: bool | None = None  # /usr/bin/zstd in flash-rootA; None: as the release
    with_inner_image: bool = True  # False: /opt holds no image (error case)
    with_rootA: bool = True  # False: partition 2 holds zeros, no flash-rootA (error case)
    with_flasher_unit: bool = True  # False: no resin-init-flasher.service (unknown units)
    signed: bool = False  # a signed build: .sig beside the image, /balena-keys on flash-boot
    efi_only: bool = False  # the inner image has no BIOS boot code, no /grub/i386-pc
    gpt: bool = False  # a GPT table (generic-amd64's) instead of msdos
    seed: int = 1

    @property
    def zstd(self) -> bool:
        return self.release.zstd if self.with_zstd is None else self.with_zstd


# --------------------------------------------------------------------------- pieces


@dataclasses.dataclass(frozen=True)
class Grub:
    """GRUB for a legacy BIOS: boot.img (the MBR's code), core.img (from sector 1) and the
    files of /grub/i386-pc on the boot partition (relative path -> host file)."""

    boot_img: bytes
    core_img: bytes
    modules: Mapping[str, Path]


def host_grub(work: Path) -> Grub:
    """This host's GRUB (grub-pc-bin): boot.img, a core.img by grub-mkimage, a module sample."""
    boot, core = imaging.grub_boot_code(work)
    modules = Path("/usr/lib/grub/i386-pc")
    return Grub(boot, core, {f"grub/i386-pc/{name}": modules / name
                             for name in GRUB_MODULE_SAMPLE})


@dataclasses.dataclass(frozen=True)
class Extras:
    """What the bootable rig (tests.rig.bootimages) adds to a row's images so that QEMU
    boots them: a GRUB whose core.img finds its modules, a real kernel and initramfs where
    the row keeps the kernel (GRUB entries then get an initrd line: the real images bundle
    the initramfs into the kernel), the image's /grub/grub.cfg (also flash-boot's
    grub.cfg_internal, which the real flasher copies over it), and the root filesystem's
    userland."""

    grub: Grub | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    image_cfg: str | None = None
    rootfs: Callable[[Tree], None] | None = None
    boot_files: Mapping[str, bytes] = dataclasses.field(default_factory=dict)  # flash-boot

    def entry_lines(self, release: Release) -> str:
        if self.initrd is None:
            return ""
        return f"initrd {_initrd_path(release)}"


def _initrd_path(release: Release) -> str:
    return "/boot/initrd" if release.kernel_in_rootfs else "/initrd"


def _boot_code(image: Path, grub: Grub) -> None:
    """boot.img's first 440 bytes in the MBR (disk id and table stay), core.img from sector 1."""
    imaging.write_at(image, 0, grub.boot_img[:440])
    imaging.write_at(image, SECTOR, grub.core_img)


def _resinos_rootfs(tree: Tree, release: Release, seed: int) -> None:
    """About 12 MiB: incompressible binaries and compressible text in /usr and /etc."""
    binaries = {"usr/bin/balena": 3 * MiB, "usr/bin/NetworkManager": 1536 * KiB,
                "usr/bin/openvpn": 640 * KiB, "usr/bin/busybox": 512 * KiB,
                "usr/lib/libc.so.6": 1280 * KiB, "usr/lib/libsystemd-shared.so": 1280 * KiB}
    texts = {"usr/lib/udev/hwdb.txt": 2 * MiB, "usr/lib/modules/modules.alias": 1536 * KiB,
             "etc/ssl/certs/ca-certificates.crt": 256 * KiB, "etc/services": 128 * KiB}
    for rel, size in binaries.items():
        tree.file(rel, imaging.random_bytes(size, seed, "resinos", rel),
                  0o755 if "/bin/" in rel else 0o644)
    for rel, size in texts.items():
        tree.file(rel, imaging.text_bytes(size, seed, "resinos", rel))
    tree.file("etc/os-release", os_release(release))
    tree.file("etc/hostname", b"balena\n")
    tree.file("etc/fstab", b"/dev/root / auto defaults 1 1\n")


def _common_boot_files(release: Release, seed: int, what: str) -> dict[str, Path | bytes]:
    """What the image and the flasher both carry on their boot partitions."""
    files: dict[str, Path | bytes] = {
        "device-type.json": device_type_json(release),
        "image-version-info": f"{release.image_flag_file}-{release.machine}-"
                              f"{release.version}\n".encode(),
        release.fingerprint: imaging.text_bytes(4 * KiB, seed, what, "fingerprint"),
        release.splash: imaging.png(seed, what, "splash"),
        "system-connections/README.ignore": b"NetworkManager keyfiles placed here are "
                                             b"copied to the device.\n",
        f"system-connections/{release.sample_connection}":
            b"[connection]\nid=sample\ntype=wifi\n",
        "EFI/BOOT/bootx64.efi": imaging.random_bytes(256 * KiB, seed, what, "bootx64.efi"),
        "EFI/BOOT/x86_64-efi/normal.mod": imaging.random_bytes(64 * KiB, seed, what, "efi-mod"),
    }
    if release.balena_names:
        files["os-release"] = os_release(release)
    if release.grubenv:
        files["grub/grubenv"] = files["EFI/BOOT/grubenv"] = grubenv_block()
    if release.extraenv:
        files["grub/grub_extraenv"] = files["EFI/BOOT/grub_extraenv"] = grubenv_block(
            "# GRUB Environment Block\n")
    return files


# --------------------------------------------------------------------------- resinOS image


def build_resinos_image(path: Path, release: Release = DEFAULT, seed: int = 1,
                        efi_only: bool = False, extras: Extras = Extras()) -> None:
    """Write the resinOS image of a release row (sparse) to path.

    msdos, 4 MiB aligned; resin-boot (FAT16, boot flag), resin-rootA, resin-rootB, extended,
    resin-state, resin-data (ext4), of the release's sizes. Images that boot a legacy BIOS
    by themselves (bi v2.21.0+rev1 on) carry GRUB's boot.img in the MBR, core.img from
    sector 1 and /grub/grub.cfg; older ones leave that to the flasher (the boot files are on
    resin-boot's /grub); efi_only: neither, as before bi v2.9.2+rev1."""
    path = Path(path)
    root = release.root_mib * MiB
    parts = imaging.msdos_layout(
        [(release.boot_mib * MiB, TYPE_FAT16_LBA, True), (root, TYPE_LINUX, False),
         (root, TYPE_LINUX, False)],
        [release.state_mib * MiB, release.data_mib * MiB])
    by_number = {p.number: p for p in parts}
    with tempfile.TemporaryDirectory(prefix="resinos-") as tmp:
        work = Path(tmp)
        imaging.new_sparse(path, parts[-1].end * SECTOR)
        imaging.write_table(path, parts, imaging.fixed_u32(seed, "resinos", "label-id"))
        grub = extras.grub or host_grub(work)
        boots_bios = release.image_boots_bios and not efi_only
        if boots_bios:
            _boot_code(path, grub)
        kernel: Path | bytes = extras.kernel or imaging.random_bytes(1 * MiB, seed, "resinos",
                                                                     "kernel")

        files = _common_boot_files(release, seed, "resinos")
        files["config.json"] = json.dumps({"deviceType": release.slug,
                                           "persistentLogging": False}).encode() + b"\n"
        files[release.image_flag_file] = FLAG_TEXT
        if not efi_only:
            files.update({"grub/boot.img": grub.boot_img, "grub/core.img": grub.core_img,
                          **grub.modules})
        if boots_bios:
            cfg = (extras.image_cfg or internal_grub_cfg(release)).encode()
            files["grub/grub.cfg"] = files["EFI/BOOT/grub.cfg"] = cfg
        if not release.kernel_in_rootfs:
            files["vmlinuz"] = kernel
            if extras.initrd is not None:
                files["initrd"] = extras.initrd
        p1 = by_number[1]
        imaging.make_fat16(work / "p1", p1.nbytes, "resin-boot", seed, p1.start, files, work)
        imaging.place(work / "p1", path, p1.offset, p1.nbytes)

        root_a = Tree(work / "rootA")
        _resinos_rootfs(root_a, release, seed)
        if release.kernel_in_rootfs:
            _put(root_a, "boot/bzImage", kernel)
            if extras.initrd is not None:
                _put(root_a, "boot/initrd", extras.initrd)
        if extras.rootfs is not None:
            extras.rootfs(root_a)
        data = Tree(work / "data")
        data.file("README", b"synthetic resin-data partition\n")
        data.file("docker/.keep", b"")
        for number, label, tree in ((2, "resin-rootA", root_a), (3, "resin-rootB", None),
                                    (5, "resin-state", None), (6, "resin-data", data)):
            part = by_number[number]
            img = work / f"p{number}"
            imaging.make_ext4(img, part.nbytes, label, seed, tree, work)
            imaging.place(img, path, part.offset, part.nbytes)
            img.unlink()


def _put(tree: Tree, rel: str, content: Path | bytes, mode: int = 0o644) -> None:
    if isinstance(content, bytes):
        tree.file(rel, content, mode)
    else:
        tree.copy(rel, content, mode)


# --------------------------------------------------------------------------- flasher image

_INIT_FLASHER = r"""#!/bin/bash
# Synthetic stand-in for balena's resin-init-flasher (tests only): writes the image in /opt
# to the first internal disk that is not the one / is on, as the real one does.
set -e
. /etc/resin-init-flasher.conf
image=/opt/${BALENA_IMAGE:-$RESIN_IMAGE}
root_dev=$(findmnt -n -o SOURCE / || true)
for dev in $INTERNAL_DEVICE_KERNEL; do
    if [ -b "/dev/$dev" ] && [ "${root_dev#/dev/$dev}" = "$root_dev" ]; then
        dd if="$image" of="/dev/$dev" bs=4M conv=sparse
        exit 0
    fi
done
echo "resin-init-flasher: no internal device" >&2
exit 1
"""

_REGISTER = r"""#!/bin/bash
# Synthetic stand-in for balena's resin-device-register (tests only): like the real one it
# retries until the API in config.json answers, which it never does here.
api=$(sed -n 's/.*"apiEndpoint": *"\([^"]*\)".*/\1/p' /mnt/boot/config.json)
while true; do
    echo "resin-device-register: cannot reach ${api:-the API}; retrying" >&2
    sleep 10
done
"""


def flash_boot_files(release: Release, seed: int, config: bytes, kernel: Path | bytes,
                     grub: Grub, extras: Extras = Extras(), signed: bool = False
                     ) -> dict[str, Path | bytes]:
    """flash-boot's files of a release (relative path -> bytes or host file); the kernel
    (and the rig's initrd) when the release boots it from flash-boot."""
    cfg = external_grub_cfg(release, extras.entry_lines(release)).encode()
    files = _common_boot_files(release, seed, "flasher")
    files.update({
        "config.json": config,
        release.flag_file: FLAG_TEXT,
        "grub/grub.cfg": cfg,
        "EFI/BOOT/grub.cfg": cfg,
        "grub.cfg_internal": (extras.image_cfg or internal_grub_cfg(release)).encode(),
        "grub/boot.img": grub.boot_img,
        "grub/core.img": grub.core_img,
        **grub.modules,
    })
    if release.system_proxy:
        files["system-proxy/README.ignore"] = b"redsocks.conf placed here is copied to the " \
                                              b"device.\n"
        files["system-proxy/redsocks.conf.ignore"] = b"base {\n log_debug = off;\n}\n"
    if release.luks_cfg or signed:  # balena-intel ships it in unsigned builds too
        files["grub.cfg_internal_luks"] = internal_grub_cfg(release).encode()
    if not release.kernel_in_rootfs:
        files["vmlinuz"] = kernel
        if extras.initrd is not None:
            files["initrd"] = extras.initrd
    files.update(extras.boot_files)
    if signed:
        files["balena-keys/db.auth"] = imaging.random_bytes(2 * KiB, seed, "keys", "db")
    return files


def flasher_rootfs(tree: Tree, release: Release, boot_files: dict[str, Path | bytes],
                   kernel: Path | bytes, extras: Extras = Extras(),
                   with_flasher_unit: bool = True) -> None:
    """What flash-rootA holds around the inner image: os-release, the flasher's config and
    scripts, its systemd units where the release installs and enables them, the kernel
    when GRUB loads it from here, and the copy of flash-boot under /flash-boot."""
    tree.file("etc/os-release", os_release(release))
    tree.file("etc/resin-init-flasher.conf", flasher_conf(release))
    tree.file("usr/bin/resin-init-flasher", _INIT_FLASHER.encode(), 0o755)
    tree.file("usr/bin/resin-device-register", _REGISTER.encode(), 0o755)
    for unit in flasher_units(release):
        if unit.name == "resin-init-flasher.service" and not with_flasher_unit:
            continue
        tree.file(unit.path, unit.text().encode())
        tree.symlink(unit.wants_link, unit.path)
    if release.kernel_in_rootfs:
        _put(tree, release.kernel_path.lstrip("/"), kernel)
        if extras.initrd is not None:
            _put(tree, _initrd_path(release).lstrip("/"), extras.initrd)
    for rel, content in boot_files.items():  # image-balena.bbclass: cp -r boot dir to rootfs
        _put(tree, f"flash-boot/{rel}", content)


def _host_tool(name: str) -> Path:
    found = shutil.which(name, path=imaging.base_env()["PATH"])
    if found is None:
        raise ImageError(f"no {name} binary on this host")
    return Path(found).resolve()


def build_flasher_image(path: Path, spec: FlasherSpec = FlasherSpec(),
                        inner: Path | None = None, extras: Extras = Extras()) -> None:
    """Write the flasher of spec (sparse) to path: flash-boot (FAT16, boot+lba),
    flash-rootA (ext4, the inner image in /opt stored sparse: inner when given, else the
    row's build_resinos_image), flash-rootB (small ext4), extended (lba), flash-state and
    flash-data (unformatted)."""
    path = Path(path)
    release, seed = spec.release, spec.seed
    kernel: Path | bytes = extras.kernel or imaging.random_bytes(_FLASH_KERNEL_SIZE, seed,
                                                                 "flasher", "kernel")
    with tempfile.TemporaryDirectory(prefix="flasher-") as tmp:
        work = Path(tmp)
        config = json.dumps({"deviceType": release.slug, "applicationName": "synthetic",
                             "apiEndpoint": "https://api.balena-cloud.com"}).encode() + b"\n"
        grub = extras.grub or host_grub(work)
        boot_files = flash_boot_files(release, seed, config, kernel, grub, extras, spec.signed)

        root_a = Tree(work / "rootA")
        root_a.dir("opt")
        if spec.with_inner_image:
            image = root_a.path(f"opt/{release.inner_name}")
            if inner is not None:
                imaging.run(["cp", "--sparse=always", inner, image])
            else:
                build_resinos_image(image, release, seed=seed, efi_only=spec.efi_only)
            if spec.signed:
                root_a.file(f"opt/{release.inner_name}.sig",
                            imaging.random_bytes(512, seed, "flasher", "sig"))
        sh_stand_in = b"\x7fELF\x02\x01\x01\x00" + imaging.random_bytes(16 * KiB, seed, "sh")
        if extras.rootfs is not None:  # a real userland, its merged /usr first
            extras.rootfs(root_a)
        else:
            root_a.file("bin/sh", sh_stand_in, 0o755)
            root_a.file("bin/bash", sh_stand_in, 0o755)
            # every flasher has gzip (GNU or busybox); stage 2 decompresses with it
            root_a.file("bin/gzip", _host_tool("gzip").read_bytes(), 0o755)
            if spec.zstd:
                root_a.file("usr/bin/zstd", _host_tool("zstd").read_bytes(), 0o755)
        flasher_rootfs(root_a, release, boot_files, kernel, extras, spec.with_flasher_unit)
        raw = root_a.apparent_size()
        root_a_size = imaging.round_up(int(raw * _ROOTA_FREE_FACTOR) + _ROOTA_OVERHEAD, ALIGN)

        parts = imaging.msdos_layout(
            [(release.boot_mib * MiB, TYPE_FAT16_LBA, True), (root_a_size, TYPE_LINUX, False),
             (_FLASH_ROOTB_SIZE, TYPE_LINUX, False)],
            [_FLASH_STATE_SIZE, _FLASH_DATA_SIZE])
        by_number = {p.number: p for p in parts}
        imaging.new_sparse(path, parts[-1].end * SECTOR)
        if spec.gpt:  # generic-amd64: EFI only, no BIOS boot code over the GPT header
            _write_gpt(path, parts)
        else:
            imaging.write_table(path, parts, imaging.fixed_u32(seed, "flasher", "label-id"))
            _boot_code(path, grub)  # the flasher boots by BIOS itself (bi write_mbr)

        p1 = by_number[1]
        imaging.make_fat16(work / "p1", p1.nbytes, "flash-boot", seed, p1.start, boot_files,
                           work)
        imaging.place(work / "p1", path, p1.offset, p1.nbytes)
        (work / "p1").unlink()
        if spec.with_rootA:
            p2 = by_number[2]
            imaging.make_ext4(work / "p2", p2.nbytes, "flash-rootA", seed, root_a, work)
            imaging.place(work / "p2", path, p2.offset, p2.nbytes)
            (work / "p2").unlink()
        p3 = by_number[3]
        imaging.make_ext4(work / "p3", p3.nbytes, "flash-rootB", seed, None, work)
        imaging.place(work / "p3", path, p3.offset, p3.nbytes)
        # 5 flash-state and 6 flash-data stay unformatted (zeros)


def _write_gpt(image: Path, parts: Sequence[imaging.Part]) -> None:
    """The same partitions in a GPT table, as balena-generic's generic-amd64 images have."""
    lines = ["label: gpt", "unit: sectors", ""]
    for part in parts:
        if part.type != imaging.TYPE_EXTENDED_LBA:
            kind = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" if part.number == 1 else \
                "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
            lines.append(f"start={part.start}, size={part.size}, type={kind}")
    # the backup GPT takes the disk's last 33 sectors, which the msdos layout gives to
    # flash-data: the disk grows by one alignment (sfdisk refuses the table otherwise)
    end = max(part.end for part in parts) * SECTOR
    with open(image, "r+b") as f:
        f.truncate(imaging.round_up(end + 33 * SECTOR, ALIGN))
    imaging.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", image],
                stdin="\n".join(lines) + "\n")


# --------------------------------------------------------------------------- cache

SOURCES = (Path(__file__), Path(imaging.__file__), Path(__file__).with_name("releases.py"))


def cached_flasher(spec: FlasherSpec = FlasherSpec()) -> Path:
    """The flasher of spec, built once into cache_dir() (keyed by these modules' sources and
    the spec) and reused. Never modify it: copy it first."""
    return imaging.cached(f"flasher-{imaging.key(*SOURCES, spec)}.img",
                          lambda tmp: build_flasher_image(tmp, spec))


def cached_resinos(release: Release = DEFAULT, seed: int = 1) -> Path:
    """The resinOS image of a release row, built once into cache_dir()."""
    return imaging.cached(f"resinos-{imaging.key(*SOURCES, release, seed)}.img",
                          lambda tmp: build_resinos_image(tmp, release, seed))


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a synthetic flasher (or the resinOS image inside it) of one "
                    "release row.")
    parser.add_argument("out_path", metavar="OUT_PATH", type=Path)
    parser.add_argument("--release", default=DEFAULT.name, choices=sorted(RELEASES),
                        help=f"the release row (default {DEFAULT.name})")
    parser.add_argument("--resinos", action="store_true",
                        help="write the inner resinOS image instead")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    release = RELEASES[args.release]
    try:
        if args.resinos:
            build_resinos_image(args.out_path, release, seed=args.seed)
        else:
            build_flasher_image(args.out_path, FlasherSpec(release=release, seed=args.seed))
    except ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(args.out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
