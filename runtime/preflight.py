"""Preflight: every fact stage 1 depends on, checked before anything changes.

Each check gives what it found, what is needed and what the user can do. `check` prints
them; `plan` and `stage1` refuse to go on unless all pass.
"""

import os

from . import blockdev, bootcore, grub, mbr, system
from . import disk as disk_module
from .backup import room as backup_room
from .errors import MigrateError
from .manifest import Manifest  # noqa: F401  (type comments)
from .plan import MIB, PlanError, place
from .run import run, which
from .source import bundle_source
from .stream import ZSTD, ZSTD_MINIMUM, zstd_version

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Any, Dict, List, Optional, Sequence  # noqa: F401  # novermin

    from .layout import Partition  # noqa: F401
    from .netconfig.carry import NetworkPlan  # noqa: F401
    from .plan import Placement  # noqa: F401

# What stage 1 runs, and the Debian/Ubuntu package that provides it.
TOOLS = (
    # the partition table is read and written by runtime/mbr.py, the kernel told with BLKPG:
    # partx is only the way round a refused ioctl (runtime/disk.py), not required
    ("blkid", "util-linux"),
    ("blockdev", "util-linux"),
    ("swapoff", "util-linux (mount on Ubuntu 14.04)"),
    ("swapon", "util-linux (mount on Ubuntu 14.04)"),
    ("mkswap", "util-linux"),
    ("mount", "mount"),
    ("umount", "mount"),
    ("mkfs.ext4", "e2fsprogs"),
    ("chroot", "coreutils"),
    ("sync", "coreutils"),
)
GRUB_TOOLS = (("grub-reboot", "grub2-common (grub-common on older releases)"),
              ("grub-editenv", "grub2-common (grub-common on older releases)"),
              # the flasher's own core.img (runtime/bootcore.py), the kernel read check
              ("grub-mkimage", "grub-common"),
              ("grub-fstest", "grub-common"),
              ("grub-probe", "grub-common"))
#: grub-probe --target=abstraction names for what GRUB reads but cannot write grubenv on
UNWRITABLE_ABSTRACTIONS = ("lvm", "diskfilter", "mdraid", "raid", "cryptodisk", "luks",
                           "geli")
SWAPOFF_MARGIN = 64 * MIB
SUPPORTED_OS = ("debian", "ubuntu")


class RefusedError(MigrateError):
    """A preflight check failed: nothing was changed. checks: the failed ones, if any."""

    exit_code = 10

    def __init__(self, message, checks=()):
        # type: (str, Sequence[Check]) -> None
        super().__init__(message)
        self.checks = list(checks)


class Check(object):
    def __init__(self, name, ok, found, needed="", hint=""):
        # type: (str, Optional[bool], str, str, str) -> None
        self.name = name
        self.ok = ok          # True, False, or None for a fact shown without judgement
        self.found = found
        self.needed = needed
        self.hint = hint

    def to_dict(self):
        return {"name": self.name, "ok": self.ok, "found": self.found, "needed": self.needed,
                "hint": self.hint}


class Target(object):
    """What the checks learned about the device: the facts stage 1 acts on."""

    def __init__(self, sysroot, bundle):
        # type: (str, Any) -> None
        self.sysroot = sysroot
        self.bundle = bundle        # a directory, or a source.LocalBundle/RemoteBundle
        self.manifest = None        # type: Optional[Manifest]
        self.source = None          # type: Optional[Any]  # where the streams are read
        self.disk = None            # type: Optional[str]
        self.table = None           # type: Optional[mbr.Table]
        self.swap = None            # type: Optional[Partition]
        self.swap_probe = {}        # type: Dict[str, str]
        self.swap_active = False
        self.swap_used = 0
        self.fstab_swap = None      # type: Optional[system.FstabEntry]
        self.layout = None          # type: Optional[Placement]
        self.network = None         # type: Optional[NetworkPlan]


class Preflight(object):
    """Runs the checks in order, each able to use what earlier ones found."""

    def __init__(self, sysroot="/", bundle=".", disk=None, reserve_bytes=0, skip_streams=False,
                 network_ok=False, boot_disks=None):
        # type: (str, Any, Optional[str], int, bool, bool, Optional[List[str]]) -> None
        self.target = Target(sysroot, bundle)
        # the disks a BIOS could boot instead of the root disk: all of them on the running
        # system, none given for a --sysroot (another system's disks are not known)
        self.boot_disks = boot_disks
        self.network_ok = network_ok
        self.disk_override = disk
        self.reserve_bytes = reserve_bytes
        self.skip_streams = skip_streams
        self.checks = []  # type: List[Check]

    @property
    def passed(self):
        # type: () -> bool
        return all(check.ok is not False for check in self.checks)

    def failures(self):
        # type: () -> List[Check]
        return [check for check in self.checks if check.ok is False]

    def add(self, name, ok, found, needed="", hint=""):
        # type: (str, Optional[bool], str, str, str) -> Check
        check = Check(name, ok, found, needed, hint)
        self.checks.append(check)
        return check

    def run(self):
        # type: () -> Preflight
        for step in (self.check_root, self.check_os, self.check_boot_mode, self.check_bundle,
                     self.check_disk, self.check_swap, self.check_memory, self.check_tools,
                     self.check_grub, self.check_grub_version, self.check_grub_probe,
                     self.check_flasher_kernel,
                     self.check_boot_disks,
                     self.check_foreign_flashers, self.check_layout, self.check_network):
            try:
                step()
            except (MigrateError, EnvironmentError) as exc:
                self.add(step.__name__[len("check_"):], False, str(exc))
        return self

    def check_root(self):
        uid = os.geteuid()
        self.add("root", uid == 0, "running as uid {}".format(uid), "root",
                 "run it with sudo" if uid else "")

    def check_os(self):
        release = system.os_release(self.target.sysroot)
        ids = [release.get("ID", "")] + release.get("ID_LIKE", "").split()
        name = release.get("PRETTY_NAME") or release.get("ID") or "unknown (no /etc/os-release)"
        self.add("os", any(value in SUPPORTED_OS for value in ids), name, "Debian or Ubuntu",
                 "" if any(v in SUPPORTED_OS for v in ids) else
                 "only Debian and Ubuntu devices are supported")
        self.add("kernel", None, os.uname()[2])

    def check_boot_mode(self):
        mode = system.boot_mode()
        self.add("boot mode", mode == "bios", mode, "legacy BIOS",
                 "UEFI devices are not supported yet" if mode != "bios" else "")

    def check_bundle(self):
        # a directory (--bundle), or a URL (--bundle-url: manifest.json and SHA256SUMS
        # fetched, the streams' sizes asked, no stream downloaded)
        source = bundle_source(self.target.bundle)
        manifest = source.manifest()
        self.target.manifest = manifest
        self.target.source = source
        if self.skip_streams:
            self.add("bundle", True, "manifest {} valid (streams not checked)".format(
                manifest.source.name))
            return
        self.add("bundle", True, source.check(manifest))

    def check_disk(self):
        target = self.target
        root_mount = system.mount_of(target.sysroot)
        device = system.device_by_number(root_mount.major, root_mount.minor)
        if device is None:
            self.add("root disk", False, "/ is {} ({}), not a block device".format(
                root_mount.source, root_mount.fstype), "a root filesystem on a disk partition")
            return
        if device.is_device_mapper or device.is_md:
            self.add("root disk", False, "/ is on {} (LVM, RAID or encryption)".format(
                device.path), "a root filesystem on a plain disk partition",
                "devices with / on LVM or RAID are not supported")
            return
        root_disk = device.disk.path
        if self.disk_override and os.path.realpath(self.disk_override) != root_disk:
            self.add("root disk", False, "/ of {} is on {}, not on --disk {}".format(
                target.sysroot, root_disk, self.disk_override), "the disk holding /")
            return
        target.disk = root_disk
        sector_size = blockdev.sector_size(root_disk)
        if sector_size != mbr.SECTOR:
            self.add("sector size", False, "{} bytes".format(sector_size), "512 bytes",
                     "disks with 4 KiB logical sectors are not supported")
            return
        try:
            table = disk_module.read_table(root_disk)
        except MigrateError as exc:
            self.add("partition table", False, str(exc), "an msdos partition table the "
                     "kernel, fdisk and parted read alike",
                     "repair the table with fdisk, or migrate the device another way")
            return
        target.table = table
        self.add("root disk", True, "{} on {} ({} MiB)".format(
            device.path, root_disk, table.disk_size * 512 // MIB))
        self.add("partition table", table.table == "msdos", "{}{}".format(
            table.table, ", disk identifier " + table.disk_id_text
            if table.table == "msdos" else ""), "msdos (dos)",
            "GPT disks are not supported yet" if table.table == "gpt" else
            "the disk has no partition table this program can read"
            if table.table != "msdos" else "")

    def check_swap(self):
        target = self.target
        if target.table is None or target.table.table != "msdos" or target.disk is None:
            return
        entries = [entry for entry in system.fstab(target.sysroot) if entry.fstype == "swap"]
        active = system.active_swaps()
        candidates = []
        for part in target.table.partitions:
            if part.kind == "extended":
                continue
            probe = disk_module.probe(system.partition_path(target.disk, part.number))
            # the signature decides: a partition typed 82 may hold something else
            if probe.get("TYPE") == "swap":
                candidates.append((part, probe))
        if not candidates:
            self.add("swap partition", False, self._no_swap_reason(entries, active),
                     "a swap partition on {}".format(target.disk),
                     "resin-migrate rebuilds the flasher in the swap partition; devices "
                     "without one cannot be migrated in place")
            return
        part, probe = max(candidates, key=lambda item: item[0].size)
        target.swap, target.swap_probe = part, probe
        node = system.partition_path(target.disk, part.number)
        users = system.holders(node)
        if users:
            self.add("swap partition", False, "{} is used through {} (encrypted swap, LVM or "
                     "RAID)".format(node, ", ".join(users)),
                     "a swap partition used directly",
                     "remove the swap from /etc/crypttab (or the volume group) first")
            return
        in_use = system.swap_in_use(node)
        if in_use is not None:
            target.swap_active, target.swap_used = True, in_use.used
        partuuid = target.table.partuuid(part.number)
        for entry in entries:
            if entry.names(probe.get("UUID"), probe.get("LABEL"), [node], partuuid):
                target.fstab_swap = entry
        kind = part.kind
        named = target.fstab_swap.spec if target.fstab_swap else "not in /etc/fstab"
        self.add("swap partition", True, "{} ({} partition, {} MiB, {}, fstab: {})".format(
            node, kind, part.size * 512 // MIB,
            "active, {} MiB used".format(target.swap_used // MIB) if target.swap_active
            else "inactive", named))

    def _no_swap_reason(self, entries, active):
        for swap in active:
            if swap.kind == "file":
                return "swap is a file ({}), not a partition".format(swap.path)
        for swap in active + [system.Swap(e.spec, "?", 0, 0) for e in entries]:
            dev = system.device_of_path(swap.path) if swap.path.startswith("/dev/") else None
            if swap.path.startswith("/dev/mapper/") or (dev is not None and dev.is_device_mapper):
                return "swap is on LVM or device-mapper ({})".format(swap.path)
        for entry in entries:
            if not entry.spec.startswith(("/dev/", "UUID=", "LABEL=")):
                return "swap is a file ({}), not a partition".format(entry.spec)
        return "no swap partition on the disk"

    def check_memory(self):
        target = self.target
        if not target.swap_active:
            return
        available = system.meminfo().get("MemAvailable", 0)
        needed = target.swap_used + SWAPOFF_MARGIN
        self.add("memory for swapoff", available >= needed,
                 "{} MiB available".format(available // MIB),
                 "{} MiB (swap in use + {} MiB)".format(needed // MIB, SWAPOFF_MARGIN // MIB),
                 "stop services to free memory, then run again" if available < needed else "")

    def check_tools(self):
        tools = list(TOOLS)
        manifest = self.target.manifest
        zstd = manifest is not None and any(s.compression == "zstd" for s in manifest.streams)
        if zstd:
            tools.append((ZSTD, "zstd"))
        missing = [(name, package) for name, package in tools if not which(name)]
        self.add("tools", not missing,
                 "missing: " + ", ".join(name for name, _ in missing) if missing else
                 "all present", "",
                 "install: " + "; ".join("{} from {}".format(n, p) for n, p in missing)
                 if missing else "")
        if zstd:
            self.check_zstd_version()

    def check_zstd_version(self):
        """The bundle's zstd streams need a zstd of 1.0 or later (0.x frames differ)."""
        text = ""
        if which(ZSTD):
            try:
                result = run([ZSTD, "-V"], check=False)
                text = (result.stdout + result.stderr).strip()
            except (MigrateError, EnvironmentError) as exc:
                text = str(exc)
        version = zstd_version(text)
        ok = version is not None and version[:2] >= ZSTD_MINIMUM
        needed = ".".join(str(part) for part in ZSTD_MINIMUM)
        self.add("zstd", ok, "zstd {}".format(".".join(str(part) for part in version))
                 if version else "zstd -V named no version: {!r}".format(text[:120])
                 if which(ZSTD) else "no zstd program",
                 "zstd {} or later (this bundle's streams are zstd)".format(needed),
                 "" if ok else "install zstd {} or later, or rebuild the bundle with gzip "
                 "streams, which need no tool on the device: invoke build-flasher "
                 "--stream-compression gzip (the default)".format(needed))

    def check_grub(self):
        root = self.target.sysroot
        grub_d = system.in_root(root, "etc/grub.d")
        problems = []
        if not os.path.isdir(grub_d):
            problems.append("no /etc/grub.d")
        mkconfig = [tool for tool in ("update-grub", "grub-mkconfig")
                    if grub.installed(root, tool)]
        if not mkconfig:
            problems.append("neither update-grub nor grub-mkconfig")
        for tool, _ in GRUB_TOOLS:
            if not grub.installed(root, tool):
                problems.append("no " + tool)
        for name in ("boot.img", "biosdisk.mod", "search_fs_uuid.mod"):
            if not os.path.isfile(system.in_root(root, bootcore.GRUB_DIR + "/" + name)):
                problems.append("no /{}/{} (grub-pc-bin)".format(bootcore.GRUB_DIR, name))
        grubenv = system.in_root(root, "boot/grub/grubenv")
        if not os.path.isfile(grubenv):
            problems.append("no /boot/grub/grubenv")
        else:
            mount = system.mount_of(grubenv)
            device = system.device_by_number(mount.major, mount.minor)
            if mount.fstype in ("btrfs", "zfs") or (device is not None and (
                    device.is_device_mapper or device.is_md)):
                problems.append("/boot/grub is on {} {} where GRUB cannot write grubenv, so "
                                "a one-shot boot entry is impossible".format(
                                    mount.fstype, mount.source))
            elif not os.access(grubenv, os.W_OK):
                problems.append("/boot/grub/grubenv is not writable")
        self.add("GRUB2", not problems, "; ".join(problems) or "grub.d, {}, grub-reboot, "
                 "writable grubenv".format(mkconfig[0] if mkconfig else "?"),
                 "GRUB2 with /etc/grub.d, update-grub, grub-reboot and a writable grubenv",
                 "install grub-pc (legacy BIOS GRUB2)" if problems else "")

    def check_grub_version(self):
        """GRUB 2.02~beta2 or later (grub.MINIMUM_VERSION), both as dpkg installed it and as
        the device's grub-probe names itself (a GRUB installed by hand may differ)."""
        root = self.target.sysroot
        found = []
        for package in ("grub-common", "grub-pc"):
            version = system.package_version(root, package)
            if version:
                found.append((version, "dpkg: " + package))
                break
        if grub.installed(root, "grub-probe"):
            version = grub.tool_version(self._grub_probe_version())
            if version:
                found.append((version, "grub-probe --version"))
        if not found:
            self.add("GRUB version", None, "unknown: dpkg lists no grub-common and grub-probe "
                     "--version named none")
            return
        problems = [problem for problem in (grub.version_problem(version, source)
                                            for version, source in found) if problem]
        self.add("GRUB version", not problems, "; ".join(problems) or ", ".join(
            "{} ({})".format(version, source) for version, source in found),
            "GRUB {} or later".format(grub.MINIMUM_VERSION),
            "upgrade GRUB to {} or later (grub-pc and grub-common of Ubuntu 14.04, Debian 8 "
            "or later), or migrate this device another way".format(grub.MINIMUM_VERSION)
            if problems else "")

    def _grub_probe_version(self):
        # type: () -> str
        """What `grub-probe --version` printed in the device's root ('' when it failed)."""
        try:
            with grub.Chroot(self.target.sysroot) as chroot:
                result = chroot.run(["grub-probe", "--version"])
        except (MigrateError, EnvironmentError):
            return ""
        return result.stdout + result.stderr

    def check_grub_probe(self):
        """What GRUB itself says holds /boot/grub: it writes grubenv (the one-shot entry's
        reset) only on a plain filesystem on a plain partition."""
        if not grub.installed(self.target.sysroot, "grub-probe"):
            return      # named by check_grub
        problems = self._grub_probe()
        self.add("GRUB's /boot/grub", not problems, "; ".join(problems) or
                 "grub-probe: a plain filesystem on a plain partition",
                 "/boot/grub where GRUB can write grubenv (not LVM, RAID, btrfs or ZFS)",
                 "move /boot to a plain ext2/3/4 partition, or migrate this device another "
                 "way" if problems else "")

    def check_flasher_kernel(self):
        """The device's GRUB reads a filesystem made like the one holding the flasher's
        kernel (the bundle's probe), before anything changes: stage 1 can read the real
        kernel only once it has written its partition."""
        target = self.target
        if target.manifest is None or not grub.installed(target.sysroot, "grub-fstest"):
            return      # the bundle's or GRUB's check names what is missing
        boot = target.manifest.boot
        try:
            with grub.Chroot(target.sysroot) as chroot:
                found = grub.read_probe(chroot, target.sysroot, target.source,
                                        target.manifest.stream(boot.probe), boot)
        except grub.GrubError as exc:
            self.add("flasher kernel", False, str(exc), "a GRUB that reads {}'s "
                     "filesystem".format(boot.kernel_label))
            return
        self.add("flasher kernel", True, found)

    def _grub_probe(self):
        # type: () -> List[str]
        from .errors import CommandError, ToolMissingError
        try:
            with grub.Chroot(self.target.sysroot) as chroot:
                fs = chroot.run(["grub-probe", "--target=fs", "/boot/grub"]).stdout.strip()
                abstraction = chroot.run(["grub-probe", "--target=abstraction",
                                          "/boot/grub"]).stdout.split()
        except (CommandError, ToolMissingError) as exc:
            return ["grub-probe cannot tell what holds /boot/grub ({}); update-grub would "
                    "fail the same way".format(exc)]
        unwritable = [name for name in abstraction if name in UNWRITABLE_ABSTRACTIONS]
        if fs in ("btrfs", "zfs") or unwritable:
            return ["grub-probe says /boot/grub is on {}{}: GRUB cannot write grubenv there, "
                    "so the one-shot entry would never clear".format(
                        fs, " over " + ", ".join(unwritable) if unwritable else "")]
        return []

    def check_boot_disks(self):
        """Stage 2 makes the root disk's sector 0 boot the flasher: the BIOS must be
        starting this disk's GRUB, and no other disk's boot code."""
        disk = self.target.disk
        if disk is None:
            return
        why = bootcore.grub_in_mbr(disk)
        self.add("boot code", why is None, why or "GRUB's boot.img in the MBR of {}, its "
                 "core.img on that disk".format(disk),
                 "the GRUB that boots this system installed in the MBR of {}".format(disk),
                 "run grub-install {} (and check the BIOS boots that disk), then run "
                 "again".format(disk) if why else "")
        if self.boot_disks is None and self.target.sysroot != "/":
            self.add("other boot disks", None, "not checked: --sysroot names another "
                     "system, whose other disks are not known here")
            return
        candidates = self.boot_disks if self.boot_disks is not None else \
            bootcore.whole_disks()
        others = bootcore.disks_with_boot_code(
            [path for path in candidates if os.path.realpath(path) != disk])
        self.add("other boot disks", not others, "boot code on {} as well as on {}".format(
            ", ".join(others), disk) if others else "none besides {}".format(disk),
            "boot code only on {}".format(disk),
            "unplug {0} or clear its boot code (its first 440 bytes): the BIOS could start it "
            "instead of {1}, whose GRUB stage 2 relies on".format(", ".join(others), disk)
            if others else "")

    def check_foreign_flashers(self):
        """A flasher stick left plugged in would carry the same labels (and FAT UUID)."""
        disk = self.target.disk
        if disk is None:
            return
        found = []
        for label in ("flash-boot", "flash-rootA", "flash-data"):
            for device in disk_module.devices_with_label(label):
                owner = system.device_of_path(device)
                if owner is not None and owner.disk.path != disk:
                    found.append("{} ({})".format(device, label))
        self.add("other flashers", not found, ", ".join(found) or "none",
                 "no other device with flash-* labels",
                 "unplug the device(s) carrying a resinOS flasher: GRUB could boot them "
                 "instead" if found else "")

    def check_layout(self):
        target = self.target
        if target.swap is None or target.manifest is None or target.table is None:
            return
        try:
            layout = place(target.disk or "", target.table, target.swap, target.manifest,
                           self.reserve_bytes)
        except PlanError as exc:
            self.add("swap size", False, str(exc))
            return
        target.layout = layout
        data = layout.flash[-1]
        self.add("swap size", True, "{} MiB: flash-boot, flash-rootA, and {} MiB for "
                 "flash-data".format(target.swap.size * 512 // MIB, data.size * 512 // MIB))
        self.add("backup room", None, "backup.tgz up to {} MiB (free in the image's "
                 "resin-data)".format(backup_room(target.manifest) // MIB))
        image_end = max(target.manifest.inner_image.raw_size,
                        target.manifest.inner_image.layout.end *
                        target.manifest.inner_image.layout.sector_size)
        limit = layout.protected_start * 512
        self.add("image extent", image_end <= limit,
                 "resinOS image ends at byte {} ({} MiB)".format(image_end, image_end // MIB),
                 "at most byte {} ({} MiB), where the flash partitions begin".format(
                     limit, limit // MIB),
                 "" if image_end <= limit else
                 "the swap partition lies inside the area resinOS overwrites; stage 2 would "
                 "overwrite the flasher it runs from")

    def check_network(self):
        """The network configuration resinOS gets: refused when the device's working route
        cannot be carried (it would come up unreachable), unless overridden."""
        from .netconfig.carry import NetworkPlan, device_plan, fleet_keyfiles
        fleet = fleet_keyfiles(self.target.manifest) if self.target.manifest else None
        try:
            plan = device_plan(self.target.sysroot, fleet)
        except (ValueError, LookupError, TypeError, UnicodeError) as exc:
            # a file this tool misreads must not stop a migration the user accepts
            self.target.network = NetworkPlan()
            self.add("network", None if self.network_ok else False,
                     "the network configuration could not be read: {}: {}".format(
                         type(exc).__name__, exc),
                     "readable network configuration files",
                     "run again with --network-ok to migrate without carrying it "
                     "(resinOS then uses DHCP on ethernet), and report this file")
            return
        self.target.network = plan
        refusal = plan.refusal
        if refusal and (fleet or self.network_ok):
            self.add("network", None, "WARNING: {}; going on: {}".format(
                refusal, "the bundle carries fleet keyfiles ({})".format(", ".join(fleet))
                if fleet else "--network-ok given, resinOS may come up unreachable"))
        elif refusal:
            self.add("network", False, refusal,
                     "a working route over ethernet or WiFi (WPA-PSK or open) with static or "
                     "DHCP IPv4, or fleet keyfiles for it in the bundle",
                     "resinOS would come up unreachable. Give the builder a NetworkManager "
                     "keyfile for this network (build-flasher --network DIR) or reconfigure "
                     "the device; if the bundle carries such a keyfile already, or to migrate "
                     "anyway, run again with --network-ok")
        else:
            self.add("network", True, plan.summary())
        for note in plan.warnings + plan.problems:
            self.add("network", None, note)



