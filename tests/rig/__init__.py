"""Test rig: a realistic legacy device (a real Debian root filesystem on a disk image with a
swap partition) for the runtime's loop-device tests, the tools VM, the bootable legacy
device, and the bootable flasher and resinOS stand-ins for the end-to-end runs.

- ``tests.rig.rootfs``: a cached Debian bookworm root filesystem tarball (debootstrap);
- ``tests.rig.legacy``: legacy disk images built from it, attached to loop devices and
  mounted as a sysroot;
- ``tests.rig.vm``: the tools VM, running scripts against test disks;
- ``tests.rig.bootable``: the legacy disk booting by itself under BIOS;
- ``tests.rig.bootimages``: the bootable flasher and resinOS stand-ins of a release row.

Most of it needs root (debootstrap, chroot, loop devices, mount). Commands, the cache and
QEMU go through ``tests.imaging``, shared with the rootless synthetic images.
"""

from __future__ import annotations

from tests.imaging import CommandError, ImageError, base_env, run

__all__ = ["RigError", "CommandError", "base_env", "run"]


class RigError(ImageError):
    """Base of every error raised by the test rig."""
