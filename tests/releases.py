"""The release matrix of test flashers: one row of data per shape of the real intel-nuc /
genericx86-64-ext flasher, and what each row puts where in the images.

Every fact here was read from balena's build sources; ``git -C <mirror> show TAG:PATH``
reproduces it (meta-balena: mb, balena-intel: bi):

- flag file ``/resin-image-flasher``, inner image ``resin-image-<machine>.resinos-img`` up
  to mb v2.71; ``/balena-image-flasher`` and ``balena-image-<machine>.balenaos-img`` from
  mb v2.72.0 (057621ad6); content "DO NOT REMOVE THIS FILE" (classes/image-balena.bbclass).
- the flasher's grub.cfg (bi layers/meta-*-genericx86/recipes-bsp/grub/.../grub.cfg_external,
  mb recipes-bsp/grub/grub-conf/grub.cfg_external_template from 2.9x), written to
  ``/grub/grub.cfg`` and ``/EFI/BOOT/grub.cfg`` (bi recipes-core/images/*-flasher.bbappend);
  kernel ``/vmlinuz`` on flash-boot up to bi v2.20, ``/boot/bzImage`` in flash-rootA from
  bi v2.21.0+rev1; ``flasher`` from bi v2.34.1+rev3; ``timeout=3`` in bi's own
  grub.cfg_external, the production BOOTLOADER_TIMEOUT of 0 in mb's template;
  ``source /grub/grub_extraenv`` and ``${extra_os_cmdline}`` from bi v2.51.1+rev5;
  ``console=null quiet splash
  vt.global_cursor_default=0 consoleblank=0`` (OS_KERNEL_CMDLINE, conf/distro/include/
  balena-os.inc) from mb v2.108.4 (82df437d8); ``source ${prefix}/grub_extraenv`` from mb
  v3.1.2; ``${extra_os_firmware_class_path}`` from mb v6.8.5 (410acd1ed).
- flash-boot also holds ``grub.cfg_internal``, ``/grub/{boot.img,core.img,i386-pc/}``,
  ``/EFI/BOOT/bootx64.efi``, ``/grub/grubenv`` (from bi v2.21.0+rev1),
  ``/grub/grub_extraenv`` (bi v2.51.1+rev5), ``grub.cfg_internal_luks`` (bi v2.87.26+rev1,
  54726df: in unsigned builds too), ``device-type.json`` (mb v1.12, 0142c75cd),
  ``splash/``, ``system-connections/*.ignore`` (recipes-core/images/*-image-flasher.bb),
  ``system-proxy/*.ignore`` (mb v2.108.30, 5b446ea58), ``image-version-info`` and the
  fingerprint
  (classes/image-*.bbclass, which also copies the whole boot directory into the rootfs at
  ``/flash-boot/``: the initramfs migrator's trigger).
- the flasher's units (mb recipes-support/resin-mounts/resin-mounts-flasher/,
  resin-init/resin-init-flasher/, resin-device-register/): the mount units in
  ``/etc/systemd/system`` (the recipe installs them in sysconfdir), the flasher and
  registration units in ``/lib/systemd/system``, enabled through
  ``/etc/systemd/system/multi-user.target.wants/``. mb v2.12.7 mounts flash-boot
  read-write at ``/mnt/bootorig`` and binds it to ``/mnt/boot`` with config.json bound from
  ``/tmp/conf``; later releases mount it read-only at ``/mnt/boot`` and copy config.json
  to the tmpfs ``/mnt/boottmp``. The flasher unit is ``After=resin-device-register.service``
  from mb v2.91.6 (314047e72) to v3.1.5; v3.1.6 (0b246409d) dropped it and added
  ``Wants=openvpn.service``. The registration script loops until the API answers.
- the initramfs migrator: mb v2.113.0 (c59a7090f, recipes-core/initrdscripts/files/migrate),
  removed for genericx86-64 by bi v5.3.25+rev2 (33801e4, balena-image-initramfs.bbappend).
- zstd in the flasher's rootfs: os-helpers-fs, which resin-init-flasher sources, needs it
  from mb v6.5.40 (91c07c0f2, recipes-support/os-helpers/os-helpers.bb).
- sizes (classes/image_types_balena.bbclass, bi recipes-core/images/balena-image.bbappend):
  boot 40 MiB, state 20 MiB, rootA/rootB 320 MiB; genericx86-64-ext roots 1000 MiB;
  resin-data 1024 MiB up to mb v2.38, 192 MiB from v2.39 (docker-disk.bb); mb v8.0.0
  (1712a927f): boot 100 MiB, state 80 MiB.
- legacy BIOS boot from the image's own bytes (MBR boot code, core.img, ``/grub/grub.cfg``
  on resin-boot) from bi v2.21.0+rev1; before that the flasher's board script wrote
  ``/grub/boot.img`` and ``/grub/core.img`` and copied grub.cfg_internal to /grub/grub.cfg
  (bi v2.12.7+rev2 resin-init-flasher-board).

Where a row departs from the issue that asked for it, the facts win: the "2.50" shape
(grub_extraenv) is the row ``2.51`` (bi v2.51.1+rev5), ``console=null`` first shipped in
``2.108`` (not 2.95), and real 2.113.x flashers still order the flasher unit after
registration (the ``5.1`` row has the migrator without it).
"""

from __future__ import annotations

import dataclasses
import json

__all__ = ["Release", "RELEASES", "DEFAULT", "Unit", "flasher_units", "external_grub_cfg",
           "internal_grub_cfg", "os_release", "flasher_conf", "device_type_json"]

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Release:
    """One shape of the real flasher (see the module docstring for the sources)."""

    name: str                # the row: "2.113"
    version: str             # os-release VERSION_ID of the row's board release
    meta_balena: str         # META_BALENA_VERSION ("" before it existed)
    machine: str = "genericx86-64"
    slug: str = "intel-nuc"
    balena_names: bool = True              # flag file and inner image names (mb 2.72+)
    kernel_in_rootfs: bool = True          # /boot/bzImage in flash-rootA (bi 2.21+)
    flasher_arg: bool = True               # `flasher` on the kernel line (bi 2.34.1+rev3)
    extraenv: str | None = "/grub/grub_extraenv"   # or "${prefix}/grub_extraenv", None
    os_cmdline: str = ""                   # OS_KERNEL_CMDLINE in the entry (mb 2.108.4+)
    firmware_class_path: bool = False      # ${extra_os_firmware_class_path} (mb 6.8.5+)
    mounts: str = "ro"                     # "bootorig" (mb 2.12) or "ro" (/mnt/boot ro)
    registration_ordering: bool = False    # flasher unit After=register (mb 2.91.6-3.1.5)
    openvpn_wants: bool = False            # Wants=openvpn.service (mb 3.1.6+)
    migrator: bool = False                 # the initramfs migrator (mb 2.113+, not NUC 5.3.25+)
    zstd: bool = False                     # /usr/bin/zstd in flash-rootA (mb 6.5.40+)
    image_boots_bios: bool = True          # MBR boot code, core.img, /grub/grub.cfg (bi 2.21+)
    boot_mib: int = 40                     # flash-boot and resin-boot
    state_mib: int = 20
    root_mib: int = 320                    # resin-rootA and resin-rootB
    data_mib: int = 192                    # resin-data (1024 up to mb 2.38)
    grubenv: bool = True                   # /grub/grubenv on flash-boot (bi 2.21+)
    system_proxy: bool = True              # system-proxy/ samples on flash-boot (mb 2.108.30+)
    luks_cfg: bool = True                  # grub.cfg_internal_luks on flash-boot (bi 2.87.26+rev1)
    grub_timeout: int = 0                  # 3 in bi's own grub.cfg_external (before 2.9x)

    @property
    def flag_file(self) -> str:
        return "balena-image-flasher" if self.balena_names else "resin-image-flasher"

    @property
    def image_flag_file(self) -> str:
        return "balena-image" if self.balena_names else "resin-image"

    @property
    def inner_name(self) -> str:
        if self.balena_names:
            return f"balena-image-{self.machine}.balenaos-img"
        return f"resin-image-{self.machine}.resinos-img"

    @property
    def kernel_path(self) -> str:
        """Where GRUB finds the flasher's kernel: on flash-boot or in flash-rootA."""
        return "/boot/bzImage" if self.kernel_in_rootfs else "/vmlinuz"

    @property
    def fingerprint(self) -> str:
        return "balenaos.fingerprint" if self.balena_names else "resinos.fingerprint"

    @property
    def splash(self) -> str:
        return "splash/balena-logo.png" if self.balena_names else "splash/resin-logo.png"

    @property
    def sample_connection(self) -> str:
        return "balena-sample.ignore" if self.balena_names else "resin-sample.ignore"

    def kernel_args(self) -> str:
        """The flasher entry's linux arguments, as the release's grub.cfg has them."""
        line = "root=LABEL=flash-rootA" + (" flasher" if self.flasher_arg else "")
        if self.os_cmdline:
            # "... flasher @@KERNEL_CMDLINE@@  rootwait", @@KERNEL_CMDLINE@@ being
            # "rootwait ${OS_KERNEL_CMDLINE} ${MACHINE_SPECIFIC_EXTRA_CMDLINE}" (empty here)
            line += f" rootwait {self.os_cmdline}   rootwait"
        else:
            line += " rootwait"
        if self.extraenv:
            line += " ${extra_os_cmdline}"
        if self.firmware_class_path:
            line += " ${extra_os_firmware_class_path}"
        return line


_CONSOLE_NULL = "console=null quiet splash vt.global_cursor_default=0 consoleblank=0"

RELEASES: dict[str, Release] = {row.name: row for row in (
    Release("2.12", version="2.12.7+rev2", meta_balena="", balena_names=False,
            kernel_in_rootfs=False, flasher_arg=False, extraenv=None, mounts="bootorig",
            image_boots_bios=False, data_mib=1024, grubenv=False, system_proxy=False,
            luks_cfg=False, grub_timeout=3),
    Release("2.51", version="2.51.1+rev5", meta_balena="2.51.1", balena_names=False,
            system_proxy=False, luks_cfg=False, grub_timeout=3),
    Release("2.95", version="2.95.15", meta_balena="2.95.15", registration_ordering=True,
            system_proxy=False),
    Release("2.108", version="2.108.27", meta_balena="2.108.27", os_cmdline=_CONSOLE_NULL,
            registration_ordering=True, system_proxy=False),
    Release("2.113", version="2.113.34", meta_balena="2.113.35", os_cmdline=_CONSOLE_NULL,
            registration_ordering=True, migrator=True),
    Release("5.1", version="5.1.45", meta_balena="5.1.45", os_cmdline=_CONSOLE_NULL,
            extraenv="${prefix}/grub_extraenv", openvpn_wants=True, migrator=True),
    Release("6.10", version="6.10.24", meta_balena="6.10.24", os_cmdline=_CONSOLE_NULL,
            extraenv="${prefix}/grub_extraenv", openvpn_wants=True, firmware_class_path=True,
            zstd=True),
    Release("6.10-ext", version="6.10.24", meta_balena="6.10.24", machine="genericx86-64-ext",
            slug="genericx86-64-ext", os_cmdline=_CONSOLE_NULL,
            extraenv="${prefix}/grub_extraenv", openvpn_wants=True, firmware_class_path=True,
            zstd=True, migrator=True, root_mib=1000),
    Release("8.0-ext", version="8.0.2", meta_balena="8.0.2", machine="genericx86-64-ext",
            slug="genericx86-64-ext", os_cmdline=_CONSOLE_NULL,
            extraenv="${prefix}/grub_extraenv", openvpn_wants=True, firmware_class_path=True,
            zstd=True, migrator=True, boot_mib=100, state_mib=80, root_mib=1000),
)}

#: The flasher most tests use: a current intel-nuc release.
DEFAULT = RELEASES["6.10"]


# --------------------------------------------------------------------------- systemd


@dataclasses.dataclass(frozen=True)
class Unit:
    """A systemd unit file of the flasher, where the release installs it."""

    name: str
    directory: str      # "/lib/systemd/system" or "/etc/systemd/system"
    unit: tuple[tuple[str, str], ...]
    body_section: str   # "Service" or "Mount"
    body: tuple[tuple[str, str], ...]
    wanted_by: str = "multi-user.target"

    @property
    def path(self) -> str:
        return f"{self.directory}/{self.name}"

    @property
    def wants_link(self) -> str:
        """The enablement symlink, as Yocto's systemctl makes it (absolute target)."""
        return f"/etc/systemd/system/{self.wanted_by}.wants/{self.name}"

    def text(self) -> str:
        lines = ["[Unit]", *(f"{k}={v}" for k, v in self.unit), "",
                 f"[{self.body_section}]", *(f"{k}={v}" for k, v in self.body), "",
                 "[Install]", f"WantedBy={self.wanted_by}", ""]
        return "\n".join(lines)


_ETC = "/etc/systemd/system"
_LIB = "/lib/systemd/system"
_EARLY = (("DefaultDependencies", "no"), ("Before", "umount.target"),
          ("Conflicts", "umount.target"))


def _oneshot(command: str) -> tuple[tuple[str, str], ...]:
    return (("Type", "oneshot"), ("RemainAfterExit", "yes"), ("ExecStart", command))


def flasher_units(release: Release) -> list[Unit]:
    """The flasher's own units of a release: its mounts, config copy, registration and
    flashing (text of our own, directives as the release has them)."""
    if release.mounts == "bootorig":
        mounts = [
            Unit("mnt-bootorig.mount", _ETC, (("Description", "flash-boot, read-write"), *_EARLY),
                 "Mount", (("What", "/dev/disk/by-label/flash-boot"),
                           ("Where", "/mnt/bootorig"), ("Type", "vfat"))),
            Unit("mnt-bootorig-config.json.mount", _ETC,
                 (("Description", "the volatile config.json over flash-boot's"),
                  ("DefaultDependencies", "no"),
                  ("Requires", "mnt-bootorig.mount temp-conf.service tmp.mount"),
                  ("After", "mnt-bootorig.mount temp-conf.service tmp.mount"),
                  ("Before", "umount.target"), ("Conflicts", "umount.target")),
                 "Mount", (("What", "/tmp/conf/config.json"),
                           ("Where", "/mnt/bootorig/config.json"), ("Type", "none"),
                           ("Options", "bind"))),
            Unit("mnt-boot.mount", _ETC,
                 (("Description", "flash-boot at /mnt/boot"), ("DefaultDependencies", "no"),
                  ("Requires", "mnt-bootorig.mount mnt-bootorig-config.json.mount"),
                  ("After", "mnt-bootorig.mount mnt-bootorig-config.json.mount"),
                  ("Before", "umount.target"), ("Conflicts", "umount.target")),
                 "Mount", (("What", "/mnt/bootorig"), ("Where", "/mnt/boot"), ("Type", "None"),
                           ("Options", "rbind"))),
            Unit("temp-conf.service", _ETC,
                 (("Description", "config.json copied to /tmp/conf"),
                  ("DefaultDependencies", "no"), ("Requires", "mnt-bootorig.mount tmp.mount"),
                  ("After", "mnt-bootorig.mount tmp.mount"), ("Before", "umount.target"),
                  ("Conflicts", "umount.target")),
                 "Service", (("Type", "oneshot"), ("RemainAfterExit", "yes"),
                             ("ExecStartPre", "/bin/mkdir -p /tmp/conf"),
                             ("ExecStart", "/bin/cp -vf /mnt/bootorig/config.json "
                                           "/tmp/conf/config.json"))),
            Unit("resin-boot.service", _ETC,
                 (("Description", "boot partition compatibility"), ("DefaultDependencies", "no"),
                  ("Requires", "mnt-boot.mount"), ("After", "mnt-boot.mount")),
                 "Service", _oneshot('/bin/echo "Boot partition mounted"')),
        ]
        flasher_requires = "mnt-boot.mount mnt-bootorig-config.json.mount"
        register_requires = "resin-boot.service resin-device-uuid.service " \
                            "resin-device-api-key.service"
    else:
        mounts = [
            Unit("mnt-boot.mount", _ETC, (("Description", "flash-boot, read-only"), *_EARLY),
                 "Mount", (("What", "/dev/disk/by-label/flash-boot"), ("Where", "/mnt/boot"),
                           ("Type", "vfat"), ("Options", "ro"))),
            Unit("mnt-boottmp.mount", _ETC, (("Description", "the flasher's volatile config"),
                                            *_EARLY),
                 "Mount", (("What", "/tmpfs"), ("Where", "/mnt/boottmp"), ("Type", "tmpfs"),
                           ("Options", "mode=1777,strictatime,nosuid,nodev,size=5m"))),
            Unit("temp-conf.service", _ETC,
                 (("Description", "config.json copied to /mnt/boottmp"),
                  ("DefaultDependencies", "no"), ("Requires", "mnt-boot.mount mnt-boottmp.mount"),
                  ("After", "mnt-boot.mount mnt-boottmp.mount"), ("Before", "umount.target"),
                  ("Conflicts", "umount.target")),
                 "Service", _oneshot("/bin/cp -vf /mnt/boot/config.json "
                                     "/mnt/boottmp/config.json")),
            Unit("resin-boot.service", _ETC,
                 (("Description", "boot partition compatibility"), ("DefaultDependencies", "no"),
                  ("Requires", "mnt-boot.mount temp-conf.service"),
                  ("After", "mnt-boot.mount temp-conf.service")),
                 "Service", _oneshot('/bin/echo "Boot partition mounted"')),
        ]
        flasher_requires = "mnt-boot.mount"
        register_requires = "resin-boot.service balena-device-uuid.service " \
                            "os-config-devicekey.service"
    wants = "resin-device-register.service" + (" openvpn.service" if release.openvpn_wants
                                               else "")
    after = flasher_requires + (" resin-device-register.service"
                                if release.registration_ordering else "")
    flasher = Unit("resin-init-flasher.service", _LIB,
                   (("Description", "the flasher: writes the image to the internal disk"),
                    ("Requires", flasher_requires), ("Wants", wants), ("After", after)),
                   "Service", _oneshot("/bin/bash /usr/bin/resin-init-flasher"))
    register = Unit("resin-device-register.service", _LIB,
                    (("Description", "registers the device with the API in config.json"),
                     ("Requires", register_requires), ("After", register_requires)),
                    "Service", _oneshot("/bin/bash /usr/bin/resin-device-register"))
    return [*mounts, register, flasher]


# --------------------------------------------------------------------------- boot files


def external_grub_cfg(release: Release, extra: str = "") -> str:
    """The flasher's grub.cfg (/grub/grub.cfg and /EFI/BOOT/grub.cfg on flash-boot).
    extra: lines added inside the entry (the bootable rig's initrd)."""
    head = ["# Automatically created by OE",
            "serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1"]
    if release.kernel_in_rootfs:
        head.append("insmod ext2")
    if release.extraenv:
        head += ["insmod configfile", f"source {release.extraenv}"]
    head += ["default=boot", f"timeout={release.grub_timeout}", ""]
    entry = ["menuentry 'flash'{"]
    if release.kernel_in_rootfs:
        entry.append("search --set=root --label flash-rootA")
    entry.append(f"linux {release.kernel_path} {release.kernel_args()}")
    entry += [line for line in extra.splitlines() if line]
    entry.append("}")
    return "\n".join(head + entry) + "\n"


def internal_grub_cfg(release: Release) -> str:
    """grub.cfg_internal: the configuration the flasher installs on the internal disk."""
    if not release.kernel_in_rootfs:
        return ("serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1\n"
                "default=boot\ntimeout=0\n\nmenuentry 'boot'{\n"
                "linux /vmlinuz root=LABEL=resin-rootA rootwait quiet\n}\n")
    extraenv = f"source {release.extraenv}\n" if release.extraenv else ""
    args = "rootwait " + (release.os_cmdline + " " if release.os_cmdline else "")
    args += "${extra_os_cmdline}" if release.extraenv else ""
    return ("serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1\n"
            "default=boot\ninsmod ext2\ninsmod loadenv\ntimeout=0\n\n"
            "load_env --skip-sig bootcount resin_root_part upgrade_available\n" + extraenv +
            "\nmenuentry 'boot'{\n"
            "search --set=root --label resin-rootA\n"
            f"linux /boot/bzImage root=LABEL=resin-rootA {args.strip()}\n}}\n")


GRUBENV = ("# GRUB Environment Block\nbootcount=0\nresin_root_part=2\nupgrade_available=0\n")


def grubenv_block(text: str = GRUBENV) -> bytes:
    """A grubenv file: the text padded with '#' to 1024 bytes, as grub-editenv writes it."""
    data = text.encode()
    return data + b"#" * (1024 - len(data))


def os_release(release: Release) -> bytes:
    """/etc/os-release of the flasher and of the image inside it. VERSION is the board's
    release (HOSTOS_VERSION) in every release; VERSION_ID the same from mb v2.38.0
    (40347f618), before it poky's DISTRO_VERSION: meta-resin's version, without +revN."""
    name = "balenaOS" if release.balena_names else "Resin OS"
    ident = "balena-os" if release.balena_names else "resin-os"
    version_id = release.version if release.meta_balena else release.version.split("+")[0]
    fields = [("ID", ident), ("NAME", name), ("VERSION", release.version),
              ("VERSION_ID", version_id), ("PRETTY_NAME", f"{name} {release.version}"),
              ("MACHINE", release.machine), ("SLUG", release.slug)]
    if release.meta_balena:
        fields.append(("META_BALENA_VERSION", release.meta_balena))
    return "".join(f'{key}="{value}"\n' for key, value in fields).encode()


def flasher_conf(release: Release) -> bytes:
    """/etc/resin-init-flasher.conf (mb recipes-support/resin-init/resin-init-flasher.bb)."""
    image_key = "BALENA_IMAGE" if release.balena_names else "RESIN_IMAGE"
    return (
        'INTERNAL_DEVICE_KERNEL="nvme0n1 sda sdb mmcblk0 mmcblk1"\n'
        "INTERNAL_DEVICE_BOOTLOADER_CONFIG=grub.cfg_internal\n"
        "INTERNAL_DEVICE_BOOTLOADER_CONFIG_PATH=/EFI/BOOT/grub.cfg\n"
        "INTERNAL_DEVICE_BOOTLOADER_LEGACY_CONFIG_PATH=/grub/grub.cfg\n"
        f"{image_key}={release.inner_name}\n"
    ).encode()


def device_type_json(release: Release) -> bytes:
    """device-type.json on flash-boot: the board repo's <machine> contract, slug first."""
    return (json.dumps({"slug": release.slug, "version": 1, "arch": "amd64",
                        "yocto": {"machine": release.machine,
                                  "image": "balena-image-flasher"}}, indent=1) + "\n").encode()
