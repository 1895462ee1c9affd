"""The flasher's GRUB configuration: which kernel it boots, from where, with what arguments,
and the arguments the device's own GRUB carries for it.

Older flashers: `linux /vmlinuz root=LABEL=flash-rootA rootwait`, the kernel on flash-boot.
Newer ones: `search --set=root --label flash-rootA` then `linux /boot/bzImage ... flasher`,
the kernel on the partition the search selects; from balena-intel v2.51.1+rev5 the line
ends with `${extra_os_cmdline}` (and `${extra_os_firmware_class_path}` from meta-balena
v6.8.5), variables of the flasher's own GRUB environment (grub_extraenv) that mean nothing
in the device's GRUB; from meta-balena v2.108.4 a production image adds
`console=null quiet splash`, which would hide every kernel and stage 2 message.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from runtime.manifest import CMDLINE_PATTERN, DROPPED_ARG_PATTERN, PATH_PATTERN

from .errors import FlasherLayoutError

#: Arguments that hide the kernel's and stage 2's messages.
HIDING_ARGS = ("console=null", "quiet", "splash")
#: Where stage 2's progress shows instead: the serial port, and the screen (the last
#: console= is /dev/console, where systemd writes; stage 2 logs every line to both).
CONSOLES = ("console=ttyS0,115200n8", "console=tty0")
#: A kernel panic before stage 2 runs (no root filesystem, an initramfs that gives up)
#: reboots after this many seconds instead of waiting for a person: GRUB has spent its
#: one-shot entry by then, so the old system boots. Added unless the entry has a panic=.
PANIC = "panic=10"


@dataclass(frozen=True)
class KernelEntry:
    kernel_label: str     # filesystem label of the partition holding the kernel
    kernel: str           # path on that partition
    initrd: str | None
    cmdline: str          # the arguments the device's GRUB passes
    dropped: list[str] = field(default_factory=list)   # taken out of the entry's arguments
    added: list[str] = field(default_factory=list)     # put in instead


def first_kernel_entry(grub_cfg: str, own_label: str, where: str) -> KernelEntry:
    """The kernel of the first menu entry in grub_cfg (read from the partition own_label),
    with the arguments the device's GRUB can carry (see carry_args)."""
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
    cmdline, dropped, added = carry_args(args, where)
    for name, value in (("kernel path", kernel), ("initrd path", initrd)):
        if value is not None and not PATH_PATTERN.match(value):
            raise FlasherLayoutError(f"{where}: the {name} {value!r} has characters the GRUB "
                                     f"entry cannot carry safely (allowed: {PATH_PATTERN.pattern})")
    return KernelEntry(kernel_label=label, kernel=kernel, initrd=initrd, cmdline=cmdline,
                       dropped=dropped, added=added)


def carry_args(args: list[str], where: str) -> tuple[str, list[str], list[str]]:
    """(cmdline, dropped, added): the flasher entry's arguments without its GRUB variables
    (${...}) and without what hides stage 2, repeats removed; when no console is left, the
    serial port and the screen are added, and PANIC where no panic= is. Any other argument
    must be a plain word."""
    kept: list[str] = []
    dropped: list[str] = []
    for arg in args:
        if "$" in arg or arg in HIDING_ARGS:
            if not DROPPED_ARG_PATTERN.match(arg):
                raise FlasherLayoutError(f"{where}: the kernel argument {arg!r} has characters "
                                         "the manifest cannot record")
            dropped.append(arg)
        elif arg not in kept:
            if not CMDLINE_PATTERN.match(arg):
                raise FlasherLayoutError(
                    f"{where}: the kernel argument {arg!r} has characters the GRUB entry "
                    f"cannot carry safely (allowed: {CMDLINE_PATTERN.pattern})")
            kept.append(arg)
    added = [] if any(arg.startswith("console=") for arg in kept) else list(CONSOLES)
    if not any(arg.startswith("panic=") for arg in kept):
        added.append(PANIC)
    return " ".join(kept + added), dropped, added


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
