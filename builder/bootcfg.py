"""The flasher's GRUB configuration: which kernel it boots, from where, with what arguments.

Older flashers: `linux /vmlinuz root=LABEL=flash-rootA rootwait`, the kernel on flash-boot.
Newer ones: `search --label flash-rootA ...` then `linux /boot/<kernel> ... flasher`, the
kernel on the partition the search selects.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from runtime.manifest import CMDLINE_PATTERN, PATH_PATTERN

from .errors import FlasherLayoutError


@dataclass(frozen=True)
class KernelEntry:
    kernel_label: str     # filesystem label of the partition holding the kernel
    kernel: str           # path on that partition
    initrd: str | None
    cmdline: str


def first_kernel_entry(grub_cfg: str, own_label: str, where: str) -> KernelEntry:
    """The kernel of the first menu entry in grub_cfg (read from the partition own_label)."""
    label = own_label
    kernel = initrd = None
    args: list[str] = []
    for raw_line in grub_cfg.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        if words[0] == "search":
            label = _search_label(words) or label
        elif words[0] in ("linux", "linux16", "linuxefi") and kernel is None:
            if len(words) < 2:
                continue
            kernel, args = words[1], words[2:]
        elif words[0] in ("initrd", "initrd16", "initrdefi") and kernel and initrd is None:
            initrd = words[1] if len(words) > 1 else None
        elif words[0] == "}" and kernel:
            break
    if kernel is None:
        raise FlasherLayoutError(f"{where}: no 'linux' line in the flasher's grub.cfg; cannot "
                                 "tell which kernel boots the flasher")
    cmdline = " ".join(args)
    for name, value, pattern in (("kernel path", kernel, PATH_PATTERN),
                                 ("initrd path", initrd, PATH_PATTERN),
                                 ("kernel arguments", cmdline, CMDLINE_PATTERN)):
        if value is not None and not pattern.match(value):
            raise FlasherLayoutError(f"{where}: the {name} {value!r} has characters the GRUB "
                                     "entry cannot carry safely (allowed: "
                                     f"{pattern.pattern})")
    return KernelEntry(kernel_label=label, kernel=kernel, initrd=initrd, cmdline=cmdline)


def _search_label(words: list[str]) -> str | None:
    for index, word in enumerate(words):
        if word == "--label" and index + 1 < len(words):
            # `search --label flash-rootA --set root` or `search --set=root --label X`
            candidates = [w for w in words[index + 1:] if not w.startswith("-")]
            return candidates[0] if candidates else None
        if word.startswith("--label="):
            return word.split("=", 1)[1]
    if "-l" in words:
        rest = [w for w in words[words.index("-l") + 1:] if not w.startswith("-")]
        return rest[0] if rest else None
    return None

