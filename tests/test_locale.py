"""Text in and out of the runtime whatever the locale: files read and written as UTF-8 (the
bytes of a file that is not UTF-8 kept, runtime/files.py), output that never fails on a
character the terminal cannot show (runtime/log.py).

Python before 3.7 takes the locale's encoding for open() and sys.stdout: ASCII under
LANG=C, as services and cron jobs run. The tests that matter there run the runtime in a
child process under LC_ALL=C PYTHONUTF8=0 (which makes 3.7 and later behave the same), with
this test's own interpreter: tasks.py's test task runs this file on Python 3.6 too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from runtime import files, system
from runtime.netconfig import keyfile, nmconnection, wpa
from runtime.run import run

ROOT = Path(__file__).resolve().parent.parent
C_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONPATH": str(ROOT)}
# a dpkg status as Debian's holds it: maintainers' names in UTF-8
DPKG_STATUS = ("Package: grub-common\nStatus: install ok installed\nMaintainer: GRUB "
               "Maintainers <pkg-grub-devel@alioth-lists.debian.net>\nVersion: 2.06-13\n"
               "Description: GRUB (le chargeur d’amorçage)\n\nPackage: zstd\nStatus: install "
               "ok installed\nMaintainer: Debian Med <debian-med-packaging@lists.alioth"
               ".debian.net>\nOriginal-Maintainer: Jérôme Müller\nVersion: 1.5.4\n")


def _in_c_locale(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("LC_") and key not in ("LANG", "PYTHONIOENCODING")}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          env={**env, **C_LOCALE}, cwd=str(ROOT), timeout=60)


def test_dpkg_status_with_non_ascii_names_is_read_under_the_c_locale(tmp_path: Path) -> None:
    (tmp_path / "var/lib/dpkg").mkdir(parents=True)
    (tmp_path / "var/lib/dpkg/status").write_bytes(DPKG_STATUS.encode("utf-8"))
    result = _in_c_locale(
        "import sys\nfrom runtime.system import package_version\n"
        "print(package_version(sys.argv[1], 'grub-common'), package_version(sys.argv[1], "
        "'zstd'))", str(tmp_path))
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == b"2.06-13 1.5.4\n"


def test_a_file_that_is_not_utf8_is_read_and_written_back_byte_for_byte(tmp_path: Path) -> None:
    fstab = tmp_path / "etc/fstab"
    fstab.parent.mkdir()
    data = ("# /dev/sda5 Auslagerungsbereich (Swap) für Jürgen\n".encode("utf-8") +
            b"# a Latin-1 comment: caf\xe9\n/dev/sda1 / ext4 errors=remount-ro 0 1\n"
            b"UUID=8c6f1e2a-4b3d-4f5e-a7c9-0d1e2f3a4b5c none swap sw 0 0\n")
    fstab.write_bytes(data)
    text = system.read_text(str(fstab))
    assert [entry.fstype for entry in system.fstab(str(tmp_path))] == ["ext4", "swap"]
    files.write_atomic(str(fstab), text.replace("none swap", "none  swap"))
    assert fstab.read_bytes() == data.replace(b"none swap", b"none  swap")


def test_a_command_printing_bytes_that_are_not_utf8_keeps_them() -> None:
    result = run(["printf", "caf\\351 \\303\\274"])
    assert files.encode(result.stdout) == b"caf\xe9 \xc3\xbc"
    assert result.stdout.endswith(" \u00fc")


def test_a_latin1_ssid_is_carried_as_its_bytes() -> None:
    # wpa_supplicant writes an SSID that is not printable text as hex; café in Latin-1
    [connection] = wpa.parse('network={\n ssid=636166e9\n psk="secret-key"\n}\n',
                             "/etc/wpa_supplicant/wpa_supplicant.conf", "wlan0")
    assert keyfile.ssid_value(connection.ssid) == "99;97;102;233;"
    # and a NetworkManager 0.9 keyfile's list of byte values gives the same bytes back
    assert files.encode(nmconnection._ssid("99;97;102;233;")) == b"caf\xe9"


def test_status_prints_what_the_terminal_cannot_show_escaped(tmp_path: Path) -> None:
    """status prints the log's last lines: under the C locale, é is written as \\xe9 (the
    terminal cannot show it), a byte that was never UTF-8 as itself; no UnicodeError."""
    state = tmp_path / "var/lib/resin-migrate/state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"version": 1, "started": [], "done": []}))
    log = tmp_path / "var/log/resin-migrate.log"
    log.parent.mkdir(parents=True)
    log.write_bytes("2024-01-01 INFO backup of /srv/café → done\n".encode("utf-8") +
                    b"2024-01-01 INFO a Latin-1 label: caf\xe9\n")
    result = _in_c_locale("import sys\nfrom runtime.__main__ import main\nsys.exit(main())",
                          "--sysroot", str(tmp_path), "status")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"backup of /srv/caf\\xe9 \\u2192 done\n" in result.stdout
    assert b"a Latin-1 label: caf\xe9\n" in result.stdout


def test_the_log_file_is_utf8_and_stderr_escapes(tmp_path: Path) -> None:
    path = tmp_path / "log" / "resin-migrate.log"
    result = _in_c_locale(
        "import sys\nfrom runtime import log\nlog.tolerant_output()\nlog.setup()\n"
        "log.log.info('before the file: J\\u00fcrgen')\nlog.open_file(sys.argv[1])\n"
        "log.log.info('after: \\u2192 caf\\udce9')\nprint('stdout: \\u00fc')", str(path))
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stderr == b"before the file: J\\xfcrgen\nafter: \\u2192 caf\xe9\n"
    assert result.stdout == b"stdout: \\xfc\n"
    logged = path.read_bytes()
    assert b"INFO before the file: J\xc3\xbcrgen\n" in logged
    assert b"INFO after: \xe2\x86\x92 caf\xe9\n" in logged
