"""Reading the flasher's kernel and arguments out of its grub.cfg."""

from __future__ import annotations

import pytest

from builder.bootcfg import first_kernel_entry
from builder.errors import FlasherLayoutError

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


def test_older_flasher_boots_vmlinuz_from_flash_boot() -> None:
    entry = first_kernel_entry(OLDER, "flash-boot", "grub.cfg")
    assert (entry.kernel_label, entry.kernel, entry.initrd, entry.cmdline) == (
        "flash-boot", "/vmlinuz", None, "root=LABEL=flash-rootA rootwait")


def test_newer_flasher_boots_from_the_searched_label() -> None:
    entry = first_kernel_entry(NEWER, "flash-boot", "grub.cfg")
    assert (entry.kernel_label, entry.kernel, entry.initrd, entry.cmdline) == (
        "flash-rootA", "/boot/bzImage", "/boot/initramfs",
        "root=LABEL=flash-rootA flasher rootwait")


@pytest.mark.parametrize(("text", "message"), [
    ("menuentry 'x' {\n}\n", "no 'linux' line"),
    ("linux /vmlinuz root=LABEL=flash-rootA $extra\n", "kernel arguments"),
    ("linux ($root)/vmlinuz root=LABEL=flash-rootA\n", "kernel path"),
])
def test_entries_the_runtime_cannot_carry_are_refused(text: str, message: str) -> None:
    with pytest.raises(FlasherLayoutError, match=message):
        first_kernel_entry(text, "flash-boot", "grub.cfg")
