"""Reading the flasher's kernel and arguments out of its grub.cfg, and the arguments the
device's GRUB carries for it."""

from __future__ import annotations

import pytest

from builder.bootcfg import CONSOLES, HIDING_ARGS, PANIC, first_kernel_entry
from builder.errors import FlasherLayoutError
from runtime.manifest import CMDLINE_PATTERN
from tests.releases import RELEASES, Release, external_grub_cfg

OLDER = """\
default=boot
timeout=3
menuentry 'flash' {
linux /vmlinuz root=LABEL=flash-rootA rootwait
}
"""

NEWER = """\
set timeout=3
insmod part_msdos
insmod ext2
search --set=root --label flash-rootA
menuentry 'flash' {
    linux /boot/bzImage root=LABEL=flash-rootA flasher rootwait
    initrd /boot/initramfs
}
menuentry 'other' {
    linux /other
}
"""

ADDED = [*CONSOLES, PANIC]      # no console= and no panic= in the entry
CARRIED = " ".join(ADDED)


def test_older_flasher_boots_vmlinuz_from_flash_boot() -> None:
    entry = first_kernel_entry(OLDER, "flash-boot", "grub.cfg")
    assert (entry.kernel_label, entry.kernel, entry.initrd) == ("flash-boot", "/vmlinuz", None)
    # no console= in the entry: stage 2's progress goes to the serial port and the screen;
    # no panic=: a panic reboots (into the old system: the one-shot entry is spent)
    assert entry.cmdline == f"root=LABEL=flash-rootA rootwait {CARRIED}"
    assert (entry.dropped, entry.added) == ([], ADDED)


def test_newer_flasher_boots_from_the_searched_label() -> None:
    entry = first_kernel_entry(NEWER, "flash-boot", "grub.cfg")
    assert (entry.kernel_label, entry.kernel, entry.initrd) == (
        "flash-rootA", "/boot/bzImage", "/boot/initramfs")
    assert entry.cmdline == f"root=LABEL=flash-rootA flasher rootwait {CARRIED}"


def test_grub_variables_and_hiding_arguments_are_dropped_and_recorded() -> None:
    text = ("menuentry 'flash' {\nlinux /vmlinuz root=LABEL=flash-rootA $extra rootwait "
            "console=null quiet splash rootwait ${extra_os_cmdline}\n}\n")
    entry = first_kernel_entry(text, "flash-boot", "grub.cfg")
    assert entry.dropped == ["$extra", "console=null", "quiet", "splash", "${extra_os_cmdline}"]
    # the repeated rootwait is carried once; console=null gone, so consoles are added
    assert entry.cmdline == f"root=LABEL=flash-rootA rootwait {CARRIED}"
    assert entry.added == ADDED


def test_a_console_and_panic_the_entry_names_are_kept_and_nothing_is_added() -> None:
    text = "linux /vmlinuz root=LABEL=flash-rootA console=ttyS1,9600 panic=30 quiet\n"
    entry = first_kernel_entry(text, "flash-boot", "grub.cfg")
    assert entry.cmdline == "root=LABEL=flash-rootA console=ttyS1,9600 panic=30"
    assert (entry.dropped, entry.added) == (["quiet"], [])


@pytest.mark.parametrize("release", list(RELEASES.values()), ids=list(RELEASES))
def test_every_release_row_gives_a_carryable_command_line(release: Release) -> None:
    entry = first_kernel_entry(external_grub_cfg(release), "flash-boot", "grub.cfg")
    words = entry.cmdline.split()
    assert CMDLINE_PATTERN.match(entry.cmdline)
    assert "root=LABEL=flash-rootA" in words
    assert ("flasher" in words) == release.flasher_arg
    assert not any("$" in word or word in HIDING_ARGS for word in words)
    assert "console=ttyS0,115200n8" in words and "console=tty0" in words
    assert PANIC in words   # no row names a panic=
    # exactly the row's GRUB variables and what hides stage 2, in the entry's order
    expected = [word for word in release.kernel_args().split()
                if "$" in word or word in HIDING_ARGS]
    assert entry.dropped == expected
    assert ("${extra_os_cmdline}" in entry.dropped) == (release.extraenv is not None)
    assert ("${extra_os_firmware_class_path}" in entry.dropped) == release.firmware_class_path


@pytest.mark.parametrize(("text", "message"), [
    ("menuentry 'x' {\n}\n", "no 'linux' line"),
    ("linux /vmlinuz root=LABEL=flash-rootA init=/bin/sh;reboot\n", "kernel argument"),
    ("linux /vmlinuz root=LABEL=flash-rootA ${a;b}\n", "cannot record"),
    ("linux ($root)/vmlinuz root=LABEL=flash-rootA\n", "kernel path"),
])
def test_entries_the_runtime_cannot_carry_are_refused(text: str, message: str) -> None:
    with pytest.raises(FlasherLayoutError, match=message):
        first_kernel_entry(text, "flash-boot", "grub.cfg")
