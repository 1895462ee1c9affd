"""Test rig: a realistic legacy device (a real Debian root filesystem on a disk image
with a swap partition) for the runtime's loop-device tests, and later for the VM rig.

- ``tests.rig.rootfs``: a cached Debian bookworm root filesystem tarball (debootstrap);
- ``tests.rig.legacy``: legacy disk images built from it, attached to loop devices and
  mounted as a sysroot.

Everything here needs root (debootstrap, chroot, loop devices, mount). The shared
pieces live in this module: the error base and the one ``run()`` every external
command goes through.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["RigError", "CommandError", "run"]

log = logging.getLogger(__name__)


class RigError(Exception):
    """Base of every error raised by the test rig."""


class CommandError(RigError):
    """An external command failed."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(
            f"command failed (exit code {returncode}): {shlex.join(self.argv)}\n"
            f"stderr: {stderr.strip()}"
        )


def base_env() -> dict[str, str]:
    """The minimal environment commands run with (sbin on PATH, C locale, no prompts)."""
    path = os.environ.get("PATH", "/usr/bin:/bin")
    dirs = path.split(os.pathsep)
    extra = [d for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin") if d not in dirs]
    return {
        "PATH": os.pathsep.join([*dirs, *extra]),
        "LC_ALL": "C",
        "TZ": "UTC",
        "HOME": "/root",
        "DEBIAN_FRONTEND": "noninteractive",
    }


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    ok_codes: Iterable[int] = (0,),
    timeout: float | None = 600,
) -> subprocess.CompletedProcess[str]:
    """Run one command in a minimal environment; raise CommandError on failure."""
    args = [os.fspath(a) for a in argv]
    full_env = base_env()
    if env:
        full_env.update(env)
    log.debug("run: %s", shlex.join(args))
    try:
        proc = subprocess.run(
            args,
            input=stdin,
            capture_output=True,
            text=True,
            errors="replace",
            env=full_env,
            check=False,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CommandError(args, -1, str(exc)) from exc
    if proc.returncode not in tuple(ok_codes):
        raise CommandError(args, proc.returncode, proc.stderr or proc.stdout[-4000:])
    return proc
