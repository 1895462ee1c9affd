"""The one-shot GRUB entry that boots the flasher from flash-boot once.

A script in /etc/grub.d adds the entry to grub.cfg; `grub-reboot` sets next_entry in
grubenv, which GRUB clears as it boots it, so any failure after that brings the old
default entry back on the next boot.
"""

import os
import tempfile

from .errors import MigrateError
from .files import ENCODING, ERRORS, read_text
from .run import run
from .system import in_root

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Any, Optional  # noqa: F401  # novermin

    from .manifest import Boot, Stream  # noqa: F401

ENTRY_ID = "resin-migrate-flasher"
ENTRY_SCRIPT = "/etc/grub.d/42_resin-migrate"
GRUB_CFG = "/boot/grub/grub.cfg"
GRUBENV = "/boot/grub/grubenv"
ONE_SHOT_TIMEOUT = 1    # seconds of menu on the one-shot boot
# The oldest GRUB this runtime accepts: Ubuntu 14.04's and Debian 8's. Upstream grub-reboot
# sets the one-shot next_entry from 2.02~beta1 (util/grub-reboot.in; 2.00's rewrote
# saved_entry instead), and every option the runtime gives GRUB's tools is in 2.02~beta2.
MINIMUM_VERSION = "2.02~beta2"


class GrubError(MigrateError):
    exit_code = 11


def entry_script(boot, fs_uuid):
    # type: (Boot, str) -> str
    """The /etc/grub.d script; every value comes from the validated manifest or blkid."""
    lines = [
        "#!/bin/sh",
        "# Written by resin-migrate stage 1: boots the resinOS flasher once (grub-reboot).",
        "# 'resin-migrate.pyz rollback' removes it.",
        "cat <<'END_OF_ENTRY'",
        # On the one boot that runs the entry: never wait at a menu (Ubuntu's recordfail
        # makes it wait, older releases forever), and should the entry fail to load, boot
        # the system's own default instead.
        'if [ "${{default}}" = "{}" ]; then'.format(ENTRY_ID),
        '	if [ -n "${saved_entry}" ]; then set fallback="${saved_entry}"; '
        'else set fallback=0; fi',
        "	set timeout={}".format(ONE_SHOT_TIMEOUT),
        "fi",
        "menuentry 'resin-migrate: resinOS flasher' --id {} {{".format(ENTRY_ID),
        "\tinsmod part_msdos",
        "\tinsmod fat",
        "\tinsmod ext2",
        "\tsearch --no-floppy --fs-uuid --set=root {}".format(fs_uuid),
        "\tlinux {} {}".format(boot.kernel, boot.cmdline),
    ]
    if boot.initrd:
        lines.append("\tinitrd {}".format(boot.initrd))
    lines += ["}", "END_OF_ENTRY", ""]
    return "\n".join(lines)


class Chroot(object):
    """Runs GRUB's commands in the device's root: directly on "/", chrooted elsewhere with
    /dev, /proc and /sys bound, as installers do."""

    def __init__(self, sysroot):
        # type: (str) -> None
        self.sysroot = sysroot
        self.bound = []  # type: list

    def __enter__(self):
        if self.sysroot != "/":
            for name in ("dev", "proc", "sys"):
                target = in_root(self.sysroot, name)
                if not os.path.ismount(target):
                    run(["mount", "--bind", "/" + name, target])
                    self.bound.append(target)
        return self

    def __exit__(self, *exc):
        for target in reversed(self.bound):
            run(["umount", "-l", target], check=False)
        self.bound = []

    def run(self, argv):
        if self.sysroot == "/":
            return run(argv)
        return run(["chroot", self.sysroot] + list(argv))

    def mkconfig(self):
        if installed(self.sysroot, "update-grub"):
            return self.run(["update-grub"])
        return self.run(["grub-mkconfig", "-o", GRUB_CFG])


def check_kernel_readable(chroot, sysroot, disk, number, boot):
    # type: (Chroot, str, str, int, Boot) -> None
    """The device's own GRUB reads the flasher's kernel where its one-shot entry and the
    flasher's core.img look for it: grub-fstest (GRUB's filesystem drivers, the installed
    version) copies (loop0,msdosN)KERNEL out of the disk, and it must be the manifest's
    bytes. An older GRUB that does not know the filesystem's features would stop at boot
    instead. (`check` has read the bundle's probe of that filesystem already: read_probe.)"""
    from .errors import CommandError
    # grub-fstest names its one image loop0 (util/grub-fstest.c, the same from 2.00 on)
    source = "(loop0,msdos{}){}".format(number, boot.kernel)
    # the partition was written through its own device node: the whole disk's buffer cache
    # may still hold what those sectors held before
    run(["blockdev", "--flushbufs", disk])
    with Scratch(sysroot) as scratch:
        try:
            found = scratch.fstest_copy(chroot, disk, source)
        except CommandError as exc:
            raise GrubError("this device's GRUB cannot read the flasher's kernel {} on {} "
                            "({}): it could not boot it; a GRUB this old does not read that "
                            "filesystem. Nothing of GRUB was changed; run rollback".format(
                                boot.kernel, boot.kernel_label, exc)) from exc
    if found != (boot.kernel_size, boot.kernel_sha256):
        raise GrubError("this device's GRUB reads {} on {} as {} bytes with sha256 {}, the "
                        "manifest says {} bytes, {}; run rollback".format(
                            boot.kernel, boot.kernel_label, found[0], found[1],
                            boot.kernel_size, boot.kernel_sha256))


def read_probe(chroot, sysroot, bundle, stream, boot):
    # type: (Chroot, str, Any, Stream, Boot) -> str
    """The bundle's probe of the kernel's filesystem (builder/kernelprobe.py: made like
    flash-rootA's or flash-boot's, a file at the kernel's path), decompressed into RAM and
    read with the device's grub-fstest: what the probe's file reads as, as a sentence.
    Raises GrubError when GRUB cannot read it (or reads other bytes); nothing on the disk
    is touched."""
    from .errors import CommandError
    from .stream import write_stream
    with Scratch(sysroot) as scratch:
        image = scratch.path("probe.img")
        reader = bundle.open_stream(stream)
        try:
            write_stream(bundle.stream_location(stream.file), stream.compression, image,
                         stream.raw_size, stream.raw_sha256, sha256=stream.sha256,
                         size=stream.size, reader=reader, quiet=True)
        finally:
            if reader is not None:
                reader.close()
        try:
            found = scratch.fstest_copy(chroot, scratch.inside(image), "(loop0)" + boot.kernel)
        except CommandError as exc:
            raise GrubError(
                "this device's GRUB cannot read a filesystem made like {} of the flasher, "
                "where its kernel is ({}): it could not boot the flasher. Nothing was "
                "changed. Upgrade GRUB (grub-pc) to a release that reads it, or build the "
                "bundle from a flasher whose {} this GRUB reads".format(
                    boot.kernel_label, _last_line(exc), boot.kernel_label)) from exc
    if found[1] != boot.probe_sha256:
        raise GrubError("this device's GRUB reads the probe of {}'s filesystem as {} bytes "
                        "with sha256 {}, the builder wrote {}: its filesystem driver is "
                        "broken for it. Nothing was changed".format(
                            boot.kernel_label, found[0], found[1], boot.probe_sha256))
    return "GRUB reads {}'s filesystem ({} bytes at {} in the bundle's probe)".format(
        boot.kernel_label, found[0], boot.kernel)


def tool_version(text):
    # type: (str) -> Optional[str]
    """The version a GRUB tool's --version printed: "grub-probe (GRUB) 2.02~beta2-9ubuntu1"
    (program, PACKAGE_NAME, PACKAGE_VERSION: grub-core/kern/emu/argp_common.c) -> the last
    part, or None when the text is not that."""
    import re
    match = re.search(r"\(GRUB\)\s+(\d\S*)", text)
    return match.group(1) if match else None


def version_problem(version, source):
    # type: (str, str) -> Optional[str]
    """Why GRUB version (as source reported it) is too old, or None."""
    from .system import compare_versions
    if compare_versions(version, MINIMUM_VERSION) >= 0:
        return None
    return "GRUB {} ({}) is older than {}, the oldest this runtime works with (its " \
        "grub-reboot may not set a one-shot next_entry)".format(version, source,
                                                                 MINIMUM_VERSION)


def _last_line(exc):
    # type: (Exception) -> str
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else str(exc)


class Scratch(object):
    """A private directory for the inputs and outputs of GRUB's tools run in the chroot
    (grub-fstest, grub-mkimage), in RAM where the system has /dev/shm (inside the chroot,
    the bound /dev's), else in its /tmp."""

    def __init__(self, sysroot):
        # type: (str) -> None
        self.sysroot = sysroot
        self.directory = ""

    def __enter__(self):
        # type: () -> Scratch
        shm = in_root(self.sysroot, "dev/shm")
        self.directory = tempfile.mkdtemp(
            prefix="resin-migrate-fstest-",
            dir=shm if os.path.isdir(shm) else in_root(self.sysroot, "tmp"))
        return self

    def __exit__(self, *exc_info):
        import shutil
        shutil.rmtree(self.directory, ignore_errors=True)

    def path(self, name):
        # type: (str) -> str
        return os.path.join(self.directory, name)

    def inside(self, path):
        # type: (str) -> str
        """path as the chrooted commands see it."""
        return "/" + os.path.relpath(path, in_root(self.sysroot, "")).strip("/")

    def fstest_copy(self, chroot, image, source):
        # type: (Chroot, str, str) -> tuple
        """grub-fstest IMAGE cp SOURCE: (size, sha256) of what GRUB read."""
        from .bundle import sha256_file
        copy = self.path("copy")
        chroot.run(["grub-fstest", image, "cp", source, self.inside(copy)])
        try:
            return sha256_file(copy)
        finally:
            os.unlink(copy)


def installed(sysroot, tool):
    # type: (str, str) -> bool
    """Whether the system at sysroot has the program tool in its sbin or bin directories."""
    return any(os.path.exists(in_root(sysroot, os.path.join(directory, tool)))
               for directory in ("usr/sbin", "usr/bin", "sbin", "bin"))


def next_entry(chroot):
    # type: (Chroot) -> Optional[str]
    out = chroot.run(["grub-editenv", GRUBENV, "list"]).stdout
    for line in out.splitlines():
        if line.startswith("next_entry="):
            return line.split("=", 1)[1] or None
    return None


def arm(sysroot, boot, fs_uuid):
    # type: (str, Boot, str) -> None
    """Install the entry, regenerate grub.cfg, and make it the next boot only."""
    path = in_root(sysroot, ENTRY_SCRIPT)
    with open(path, "w", encoding=ENCODING, errors=ERRORS) as handle:
        handle.write(entry_script(boot, fs_uuid))
    os.chmod(path, 0o755)
    with Chroot(sysroot) as chroot:
        chroot.mkconfig()
        if "--id {}".format(ENTRY_ID) not in read_text(in_root(sysroot, GRUB_CFG)):
            raise GrubError("{} has no entry {} after regenerating it; see the log".format(
                GRUB_CFG, ENTRY_ID))
        chroot.run(["grub-reboot", ENTRY_ID])
        found = next_entry(chroot)
        if found != ENTRY_ID:
            raise GrubError("grub-reboot did not set next_entry in {} (found {!r})".format(
                GRUBENV, found))


def disarm(sysroot):
    # type: (str) -> None
    """Remove the entry and any pending one-shot boot of it."""
    path = in_root(sysroot, ENTRY_SCRIPT)
    with Chroot(sysroot) as chroot:
        if os.path.exists(path):
            os.unlink(path)
        # regenerate whenever grub.cfg still has the entry (a killed run may have removed
        # the script without regenerating)
        if "--id {}".format(ENTRY_ID) in read_text(in_root(sysroot, GRUB_CFG)):
            chroot.mkconfig()
        if next_entry(chroot) == ENTRY_ID:
            chroot.run(["grub-editenv", GRUBENV, "unset", "next_entry"])
