"""Facts of the running system, read from /proc, /sys and the root filesystem.

Every reader takes the root directory it looks at (`sysroot`, "/" on a device), so that
tests and `--sysroot` can point the runtime at another mounted root.
"""

import os
import re
import stat as stat_module

from . import files
from .errors import MigrateError

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Dict, List, Optional  # noqa: F401  # novermin


class SystemFactError(MigrateError):
    """A fact of the system could not be read."""

    exit_code = 10


def in_root(sysroot, path):
    # type: (str, str) -> str
    """path (absolute, as the device sees it) under sysroot."""
    return os.path.join(sysroot, path.lstrip("/"))


def read_text(path, default=None):
    # type: (str, Optional[str]) -> str
    """The file's text, UTF-8 whatever the locale (files.read_text); default, when given,
    if it cannot be read."""
    try:
        return files.read_text(path)
    except (IOError, OSError):
        if default is None:
            raise
        return default


def os_release(sysroot="/"):
    # type: (str) -> Dict[str, str]
    """/etc/os-release as a dict (empty when absent)."""
    values = {}
    for name in ("etc/os-release", "usr/lib/os-release"):
        text = read_text(in_root(sysroot, name), "")
        if text:
            for line in text.splitlines():
                match = re.match(r"^([A-Z_][A-Z0-9_]*)=(.*)$", line.strip())
                if match:
                    values[match.group(1)] = match.group(2).strip().strip("'\"")
            break
    return values


def boot_mode():
    # type: () -> str
    """'uefi' when the kernel was started by UEFI firmware, else 'bios'."""
    return "uefi" if os.path.isdir("/sys/firmware/efi") else "bios"


def meminfo():
    # type: () -> Dict[str, int]
    """/proc/meminfo in bytes; MemAvailable estimated on kernels older than 3.14."""
    values = {}
    for line in read_text("/proc/meminfo").splitlines():
        match = re.match(r"^(\w+):\s+(\d+)( kB)?$", line.strip())
        if match:
            values[match.group(1)] = int(match.group(2)) * (1024 if match.group(3) else 1)
    if "MemAvailable" not in values:
        values["MemAvailable"] = max(0, values.get("MemFree", 0) + values.get("Buffers", 0) +
                                     values.get("Cached", 0) - values.get("Shmem", 0))
    return values


class Swap(object):
    """An active swap area from /proc/swaps."""

    def __init__(self, path, kind, size, used):
        # type: (str, str, int, int) -> None
        self.path = path
        self.kind = kind      # 'partition' or 'file'
        self.size = size      # bytes
        self.used = used      # bytes


def active_swaps():
    # type: () -> List[Swap]
    swaps = []
    for line in read_text("/proc/swaps", "").splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 4:
            path = fields[0].replace("\\040", " ")
            swaps.append(Swap(path, fields[1], int(fields[2]) * 1024, int(fields[3]) * 1024))
    return swaps


def swap_in_use(node):
    # type: (str) -> Optional[Swap]
    """The active swap on the partition node, compared by device number, or None."""
    wanted = device_of_path(node)
    if wanted is None:
        return None
    for swap in active_swaps():
        device = device_of_path(swap.path)
        if device is not None and device.sys == wanted.sys:
            return swap
    return None


def holders(node):
    # type: (str) -> List[str]
    """Devices built on top of a partition (dm-crypt, LVM, RAID): it is in use through them."""
    device = device_of_path(node)
    if device is None:
        return []
    directory = os.path.join(device.sys, "holders")
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


class FstabEntry(object):
    """One line of /etc/fstab; `line` is its index in the file."""

    def __init__(self, line, spec, target, fstype, options, text=""):
        # type: (int, str, str, str, str, str) -> None
        self.line = line
        self.text = text      # the whole line, to recognise it again before editing it
        self.spec = spec
        self.target = target
        self.fstype = fstype
        self.options = options

    def names(self, uuid, label, paths, partuuid=None):
        # type: (Optional[str], Optional[str], List[str], Optional[str]) -> bool
        """Whether this entry's spec designates a device with this UUID, LABEL, PARTUUID or
        path (a /dev/disk/by-* link that resolves to one of paths counts too)."""
        spec = self.spec.strip("\"")
        if spec.startswith("PARTUUID="):
            return partuuid is not None and spec[9:].strip("\"").lower() == partuuid.lower()
        if spec.startswith("/dev/disk/by-partuuid/"):
            return partuuid is not None and spec.rsplit("/", 1)[1].lower() == partuuid.lower()
        if spec.startswith("/dev/") and os.path.realpath(spec) in paths:
            return True
        if spec.startswith("UUID="):
            return uuid is not None and spec[5:].strip("\"").lower() == uuid.lower()
        if spec.startswith("LABEL="):
            return label is not None and spec[6:].strip("\"") == label
        if spec.startswith("/dev/disk/by-uuid/"):
            return uuid is not None and spec.rsplit("/", 1)[1].lower() == uuid.lower()
        if spec.startswith("/dev/disk/by-label/"):
            return label is not None and spec.rsplit("/", 1)[1] == label
        return spec in paths


def fstab(sysroot="/"):
    # type: (str) -> List[FstabEntry]
    entries = []
    text = read_text(in_root(sysroot, "etc/fstab"), "")
    for index, line in enumerate(text.splitlines()):
        fields = line.split()
        if not fields or fields[0].startswith("#") or len(fields) < 3:
            continue
        entries.append(FstabEntry(index, fields[0], fields[1], fields[2],
                                  fields[3] if len(fields) > 3 else "defaults", line))
    return entries


def package_version(sysroot, package):
    # type: (str, str) -> Optional[str]
    """The installed version of a Debian package, from dpkg's status file (None if unknown)."""
    text = read_text(in_root(sysroot, "var/lib/dpkg/status"), "")
    for stanza in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines()
                      if ": " in line and not line.startswith(" "))
        if fields.get("Package") == package and "installed" in fields.get("Status", ""):
            return fields.get("Version")
    return None


def _order(char):
    # type: (str) -> int
    """dpkg's order of a character in the non-digit parts: '~' before the end of the
    string, the end before letters, letters before everything else."""
    if char == "~":
        return -1
    if not char or char.isdigit():
        return 0
    return ord(char) if char.isalpha() else ord(char) + 256


def _compare_part(a, b):
    # type: (str, str) -> int
    """dpkg's verrevcmp: non-digit runs by _order, digit runs as numbers, alternately."""
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac, bc = _order(a[i] if i < len(a) else ""), _order(b[j] if j < len(b) else "")
            if ac != bc:
                return ac - bc
            i, j = i + 1, j + 1
        start_a, start_b = i, j
        while i < len(a) and a[i].isdigit():
            i += 1
        while j < len(b) and b[j].isdigit():
            j += 1
        number_a, number_b = int(a[start_a:i] or "0"), int(b[start_b:j] or "0")
        if number_a != number_b:
            return number_a - number_b
    return 0


def compare_versions(a, b):
    # type: (str, str) -> int
    """Debian version ordering (negative, 0, positive as a sorts before, with, after b):
    epoch, upstream version, revision; '~' sorts before anything, even the end, so
    2.02~beta1 < 2.02~beta2 < 2.02 < 2.02-1 < 2.04."""
    def split(version):
        # type: (str) -> tuple
        version = version.strip()
        epoch, _, rest = version.partition(":") if ":" in version else ("0", "", version)
        upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
        return int(epoch) if epoch.isdigit() else 0, upstream, revision
    epoch_a, upstream_a, revision_a = split(a)
    epoch_b, upstream_b, revision_b = split(b)
    if epoch_a != epoch_b:
        return epoch_a - epoch_b
    return _compare_part(upstream_a, upstream_b) or _compare_part(revision_a, revision_b)


class Mount(object):
    def __init__(self, major, minor, root, target, fstype, source):
        # type: (int, int, str, str, str, str) -> None
        self.major = major
        self.minor = minor
        self.root = root
        self.target = target
        self.fstype = fstype
        self.source = source


def mounts():
    # type: () -> List[Mount]
    """/proc/self/mountinfo, in mount order."""
    found = []
    for line in read_text("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        rest = right.split()
        if len(fields) < 5 or len(rest) < 2:
            continue
        major, minor = fields[2].split(":")
        found.append(Mount(int(major), int(minor), _unescape(fields[3]),
                           _unescape(fields[4]), rest[0], _unescape(rest[1])))
    return found


def _unescape(text):
    # type: (str) -> str
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mount_of(path):
    # type: (str) -> Mount
    """The mount holding path (the last, deepest mount whose target is a prefix of it)."""
    real = os.path.realpath(path)
    best = None
    for mount in mounts():
        target = mount.target.rstrip("/") or "/"
        holds = real == target or target == "/" or real.startswith(target + "/")
        # later mounts hide earlier ones on the same target: take the last, deepest one
        if holds and (best is None or len(target) >= len(best.target.rstrip("/") or "/")):
            best = mount
    if best is None:
        raise SystemFactError("no mount holds {} (is /proc mounted?)".format(path))
    return best


class BlockDevice(object):
    """A block device as sysfs describes it."""

    def __init__(self, name):
        # type: (str) -> None
        self.name = name              # e.g. sda5, loop3p5, nvme0n1p2
        self.sys = os.path.realpath(os.path.join("/sys/class/block", name))

    @property
    def path(self):
        # type: () -> str
        return "/dev/" + self.name

    @property
    def is_partition(self):
        # type: () -> bool
        return os.path.exists(os.path.join(self.sys, "partition"))

    @property
    def number(self):
        # type: () -> int
        return int(read_text(os.path.join(self.sys, "partition")).strip())

    @property
    def disk(self):
        # type: () -> BlockDevice
        """The whole disk this partition belongs to (itself for a disk)."""
        if not self.is_partition:
            return self
        return BlockDevice(os.path.basename(os.path.dirname(self.sys)))

    @property
    def is_device_mapper(self):
        # type: () -> bool
        return self.name.startswith("dm-") or os.path.isdir(os.path.join(self.sys, "dm"))

    @property
    def is_md(self):
        # type: () -> bool
        return self.name.startswith("md")


def device_by_number(major, minor):
    # type: (int, int) -> Optional[BlockDevice]
    link = "/sys/dev/block/{}:{}".format(major, minor)
    if not os.path.exists(link):
        return None
    return BlockDevice(os.path.basename(os.path.realpath(link)))


def device_of_path(path):
    # type: (str) -> Optional[BlockDevice]
    """The block device a /dev path (or symlink to one) designates."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    if not stat_module.S_ISBLK(stat.st_mode):
        return None
    return device_by_number(os.major(stat.st_rdev), os.minor(stat.st_rdev))


def partition_path(disk, number):
    # type: (str, int) -> str
    """/dev/sda + 5 -> /dev/sda5; /dev/loop3 or /dev/nvme0n1 + 5 -> ...p5."""
    return "{}{}{}".format(disk, "p" if disk[-1].isdigit() else "", number)
