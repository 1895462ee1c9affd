"""Preflight checks that read the device's files, on a root tree made by the test."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from runtime import grub
from runtime import run as run_module
from runtime.errors import CommandError
from runtime.preflight import Preflight
from runtime.run import Result


def _sysroot(tmp_path: Path, grub_version: str | None, os_id: str = "ubuntu") -> Path:
    root = tmp_path / "root"
    for directory in ("etc/grub.d", "usr/sbin", "boot/grub", "var/lib/dpkg"):
        (root / directory).mkdir(parents=True)
    for tool in ("update-grub", "grub-reboot", "grub-editenv", "grub-mkimage", "grub-fstest",
                 "grub-probe"):
        (root / "usr/sbin" / tool).write_text("#!/bin/sh\n")
    # what the flasher's own core.img is made of (runtime/bootcore.py)
    (root / "usr/lib/grub/i386-pc").mkdir(parents=True)
    for name in ("boot.img", "biosdisk.mod", "search_fs_uuid.mod"):
        (root / "usr/lib/grub/i386-pc" / name).write_bytes(b"")
    (root / "boot/grub/grubenv").write_text("# GRUB Environment Block\n" + "#" * 998)
    (root / "etc/os-release").write_text(f'ID={os_id}\nPRETTY_NAME="{os_id} test"\n')
    if grub_version:
        (root / "var/lib/dpkg/status").write_text(
            "Package: grub-common\nStatus: install ok installed\nVersion: "
            f"{grub_version}\n\nPackage: zstd\nStatus: install ok installed\nVersion: 1.5\n")
    return root


class _Chroot:
    """grub.Chroot for check_grub_version: the device's grub-probe --version prints
    `printed` (exit 0), or fails (None)."""

    def __init__(self, printed: str | None) -> None:
        self.printed = printed
        self.ran: list[list[str]] = []

    def __call__(self, sysroot: str) -> _Chroot:
        return self

    def __enter__(self) -> _Chroot:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def run(self, argv: list[str]) -> Result:
        self.ran.append(argv)
        if self.printed is None:
            raise CommandError(argv, 64, "grub-probe: error: unknown option")
        return Result(argv, 0, self.printed, "")


# what GRUB's tools print for --version: "%s (%s) %s\n", program, PACKAGE_NAME ("GRUB"),
# PACKAGE_VERSION (grub-core/kern/emu/argp_common.c at grub-2.02-beta2); Debian and Ubuntu
# builds print their package version
@pytest.mark.parametrize(("dpkg", "printed", "ok", "named"), [
    ("2.06-13+deb12u1", "grub-probe (GRUB) 2.06-13+deb12u1\n", True,
     "2.06-13+deb12u1 (dpkg: grub-common), 2.06-13+deb12u1 (grub-probe --version)"),
    ("2.02-2ubuntu8", "grub-probe (GRUB) 2.02-2ubuntu8\n", True, "2.02-2ubuntu8"),  # 18.04
    ("2.02~beta3-5", "grub-probe (GRUB) 2.02~beta3-5\n", True, "2.02~beta3-5"),       # Debian 9
    ("2.02~beta2-9ubuntu1", "grub-probe (GRUB) 2.02~beta2-9ubuntu1\n", True,          # 14.04
     "2.02~beta2-9ubuntu1 (dpkg: grub-common)"),
    (None, "grub-probe (GRUB) 2.02~beta2\n", True, "2.02~beta2 (grub-probe --version)"),
    ("2.02~beta1-5", "grub-probe (GRUB) 2.02~beta1-5\n", False,
     "GRUB 2.02~beta1-5 (dpkg: grub-common) is older than 2.02~beta2"),
    ("2.00-22ubuntu3", "grub-probe (GRUB) 2.00-22ubuntu3\n", False,                   # 13.10
     "GRUB 2.00-22ubuntu3 (dpkg: grub-common) is older than 2.02~beta2"),
    ("1.99-21ubuntu3", None, False, "GRUB 1.99-21ubuntu3 (dpkg: grub-common) is older"),
    # a GRUB installed by hand over the package: the one that runs decides too
    ("2.02~beta2-9", "grub-probe (GRUB) 2.00\n", False,
     "GRUB 2.00 (grub-probe --version) is older than 2.02~beta2"),
    (None, None, None, "unknown"),
], ids=["bookworm", "bionic", "stretch", "trusty", "source-built", "beta1", "saucy", "precise",
        "by-hand", "unknown"])
def test_grub_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dpkg: str | None,
                      printed: str | None, ok: bool | None, named: str) -> None:
    chroot = _Chroot(printed)
    monkeypatch.setattr(grub, "Chroot", chroot)
    preflight = Preflight(str(_sysroot(tmp_path, dpkg)), str(tmp_path))
    preflight.check_grub_version()
    [check] = preflight.checks
    assert (check.name, check.ok) == ("GRUB version", ok), check.found
    assert named in check.found
    assert chroot.ran == [["grub-probe", "--version"]]
    if ok is False:
        assert check.needed == "GRUB 2.02~beta2 or later"
        assert "upgrade GRUB to 2.02~beta2 or later" in check.hint


def test_grub_version_refusal_is_exit_10(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A GRUB too old fails `check` (exit 10, nothing changed) like any other check."""
    from runtime.preflight import RefusedError
    monkeypatch.setattr(grub, "Chroot", _Chroot("grub-probe (GRUB) 2.00-22\n"))
    preflight = Preflight(str(_sysroot(tmp_path, "2.00-22")), str(tmp_path))
    preflight.check_grub_version()
    assert not preflight.passed and RefusedError.exit_code == 10


def _fake_zstd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stdout: str, stderr: str = "",
               code: int = 0) -> None:
    """A `zstd` on the runtime's minimal PATH that prints what a given release prints."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "zstd"
    script.write_text(f"#!/bin/sh\nprintf '%s' '{stdout}'\nprintf '%s' '{stderr}' >&2\n"
                      f"exit {code}\n")
    script.chmod(0o755)
    monkeypatch.setitem(run_module._BASE_ENV, "PATH", str(bin_dir))


# `zstd -V` of each generation (programs/zstdcli.c, WELCOME_MESSAGE): to stdout from 0.4,
# to stderr in 0.1-0.3; 1.5 renamed the program "Zstandard CLI"
@pytest.mark.parametrize(("stdout", "stderr", "code", "ok", "found"), [
    ("*** zstd command line interface 64-bits v1.3.3, by Yann Collet ***\n", "", 0, True,
     "zstd 1.3.3"),
    ("*** Zstandard CLI (64-bit) v1.5.5, by Yann Collet ***\n", "", 0, True, "zstd 1.5.5"),
    ("*** zstd command line interface 64-bits v1.0.0, by Yann Collet ***\n", "", 0, True,
     "zstd 1.0.0"),
    ("*** zstd command line interface 64-bits v0.5.1, by Yann Collet (Feb 20 2016) ***\n", "",
     0, False, "zstd 0.5.1"),
    ("", "*** zstd command line interface 64-bits v0.0.1, by Yann Collet (Jan 24 2015) ***\n",
     0, False, "zstd 0.0.1"),
    ("", "zstd: unknown argument -V\n", 1, False, "zstd -V named no version"),
], ids=["1.3.3", "1.5.5", "1.0.0", "0.5.1", "0.1-stderr", "unparsable"])
def test_zstd_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stdout: str,
                      stderr: str, code: int, ok: bool, found: str) -> None:
    _fake_zstd(tmp_path, monkeypatch, stdout, stderr, code)
    preflight = Preflight(str(_sysroot(tmp_path, None)), str(tmp_path))
    preflight.target.manifest = SimpleNamespace(  # type: ignore[assignment]
        streams=[SimpleNamespace(compression="gzip"), SimpleNamespace(compression="zstd")])
    preflight.check_tools()
    [check] = [check for check in preflight.checks if check.name == "zstd"]
    assert check.ok is ok, check.found
    assert check.found.startswith(found)
    assert check.needed == "zstd 1.0 or later (this bundle's streams are zstd)"
    if not ok:
        assert "install zstd 1.0 or later" in check.hint
        assert "invoke build-flasher --stream-compression gzip" in check.hint
        assert not preflight.passed


def test_zstd_bundle_without_zstd_names_gzip(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setitem(run_module._BASE_ENV, "PATH", str(tmp_path / "empty"))
    preflight = Preflight(str(_sysroot(tmp_path, None)), str(tmp_path))
    preflight.target.manifest = SimpleNamespace(  # type: ignore[assignment]
        streams=[SimpleNamespace(compression="zstd")])
    preflight.check_tools()
    tools, zstd = preflight.checks
    assert tools.ok is False and "zstd from zstd" in tools.hint
    assert (zstd.name, zstd.ok, zstd.found) == ("zstd", False, "no zstd program")
    assert "--stream-compression gzip" in zstd.hint


def test_gzip_bundle_asks_nothing_of_zstd(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_zstd(tmp_path, monkeypatch, "*** zstd command line interface 64-bits v0.5.1 ***\n")
    preflight = Preflight(str(_sysroot(tmp_path, None)), str(tmp_path))
    preflight.target.manifest = SimpleNamespace(  # type: ignore[assignment]
        streams=[SimpleNamespace(compression="gzip")])
    preflight.check_tools()
    assert [check.name for check in preflight.checks] == ["tools"]


@pytest.mark.parametrize(("os_id", "ok"), [("ubuntu", True), ("debian", True),
                                           ("fedora", False)])
def test_os_is_debian_or_ubuntu(tmp_path: Path, os_id: str, ok: bool) -> None:
    preflight = Preflight(str(_sysroot(tmp_path, None, os_id)), str(tmp_path))
    preflight.check_os()
    assert preflight.checks[0].ok is ok
    assert preflight.checks[0].found == f"{os_id} test"


@pytest.mark.parametrize(("removed", "named"), [
    (["usr/sbin/grub-reboot", "boot/grub/grubenv"],
     ["no grub-reboot", "no /boot/grub/grubenv"]),
    # what the flasher's own core.img is made with
    (["usr/sbin/grub-mkimage", "usr/lib/grub/i386-pc/search_fs_uuid.mod"],
     ["no grub-mkimage", "search_fs_uuid.mod (grub-pc-bin)"]),
], ids=["one-shot-entry", "flasher-core-img"])
def test_missing_grub_pieces_are_named(tmp_path: Path, removed: list[str],
                                       named: list[str]) -> None:
    root = _sysroot(tmp_path, None)
    for path in removed:
        (root / path).unlink()
    preflight = Preflight(str(root), str(tmp_path))
    preflight.check_grub()
    assert preflight.checks[0].ok is False
    for text in named:
        assert text in preflight.checks[0].found


@pytest.mark.parametrize(("spec", "named"), [
    ("UUID=8c6f1e2a-4b3d-4f5e-a7c9-0d1e2f3a4b5c", True),
    ("UUID=8C6F1E2A-4B3D-4F5E-A7C9-0D1E2F3A4B5C", True),
    ("LABEL=legacy-swap", True),
    ("PARTUUID=1e9ac1d5-02", True),
    ("/dev/disk/by-uuid/8c6f1e2a-4b3d-4f5e-a7c9-0d1e2f3a4b5c", True),
    ("/dev/disk/by-partuuid/1e9ac1d5-02", True),
    ("/dev/sda2", True),
    ("/dev/sda5", False),
    ("UUID=00000000-0000-0000-0000-000000000000", False),
    ("LABEL=other", False),
])
def test_fstab_names_the_swap_however_it_is_written(spec: str, named: bool) -> None:
    from runtime.system import FstabEntry
    entry = FstabEntry(0, spec, "none", "swap", "sw", f"{spec} none swap sw 0 0")
    assert entry.names("8c6f1e2a-4b3d-4f5e-a7c9-0d1e2f3a4b5c", "legacy-swap", ["/dev/sda2"],
                       "1e9ac1d5-02") is named
