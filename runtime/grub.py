"""The one-shot GRUB entry that boots the flasher from flash-boot once.

A script in /etc/grub.d adds the entry to grub.cfg; `grub-reboot` sets next_entry in
grubenv, which GRUB clears as it boots it, so any failure after that brings the old
default entry back on the next boot.
"""

import os

from .errors import MigrateError
from .run import run
from .system import in_root

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Optional  # noqa: F401  # novermin

    from .manifest import Boot  # noqa: F401

ENTRY_ID = "resin-migrate-flasher"
ENTRY_SCRIPT = "/etc/grub.d/42_resin-migrate"
GRUB_CFG = "/boot/grub/grub.cfg"
GRUBENV = "/boot/grub/grubenv"


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
    with open(path, "w") as handle:
        handle.write(entry_script(boot, fs_uuid))
    os.chmod(path, 0o755)
    with Chroot(sysroot) as chroot:
        chroot.mkconfig()
        with open(in_root(sysroot, GRUB_CFG)) as handle:
            if "--id {}".format(ENTRY_ID) not in handle.read():
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
        with open(in_root(sysroot, GRUB_CFG)) as handle:
            if "--id {}".format(ENTRY_ID) in handle.read():
                chroot.mkconfig()
        if next_entry(chroot) == ENTRY_ID:
            chroot.run(["grub-editenv", GRUBENV, "unset", "next_entry"])
