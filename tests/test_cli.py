"""The runtime's command line: the options of every command before or after its name, as
the README writes them; a conflict of --bundle and --bundle-url wherever they stand.
tasks.py's test task runs this file on Python 3.6 too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runtime.__main__ import build_parser
from tests.httpserver import BundleServer

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = ["--bundle-url", "https://updates.example/nuc/", "--ca-file", "/etc/ca.pem",
           "--retries", "3", "--disk", "/dev/sdb", "--sysroot", "/mnt/old", "-v"]


def _parsed(words: list[str]) -> dict:
    found = vars(build_parser().parse_args(words))
    return {key: value for key, value in found.items() if key != "func"}


@pytest.mark.parametrize("command", ["verify", "check", "plan", "stage1", "status"])
def test_global_options_after_the_command_mean_the_same(command: str) -> None:
    before = _parsed([*OPTIONS, command])
    assert _parsed([command, *OPTIONS]) == before
    # split on both sides of the name
    assert _parsed([*OPTIONS[:4], command, *OPTIONS[4:]]) == before
    assert before["bundle_url"] == "https://updates.example/nuc/" and before["verbose"]
    assert before["retries"] == 3 and before["sysroot"] == "/mnt/old"


def test_defaults_stay_when_no_option_follows_the_command() -> None:
    found = _parsed(["--sysroot", "/mnt/old", "--retries", "2", "check"])
    assert (found["sysroot"], found["retries"], found["bundle_url"]) == ("/mnt/old", 2, None)


def _runtime(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime", *args], capture_output=True,
                          text=True, cwd=str(ROOT), timeout=300)


def test_bundle_and_bundle_url_conflict_on_either_side() -> None:
    for words in (["--bundle", "/tmp", "verify", "--bundle-url", "https://x/"],
                  ["--bundle-url", "https://x/", "verify", "--bundle", "/tmp"]):
        result = _runtime(*words)
        assert result.returncode == 2, result.stderr
        assert "--bundle-url: not allowed with argument --bundle" in result.stderr


def test_verify_with_the_url_after_the_command(synthetic_bundle: Path) -> None:
    """`resin-migrate.pyz verify --bundle-url URL`, as the README gives it."""
    with BundleServer(synthetic_bundle) as server:
        result = _runtime("verify", "--bundle-url", server.url, "--allow-http")
    assert result.returncode == 0, result.stderr
    assert "ok  flash-rootA.gz" in result.stdout and "ok  flash-boot.gz" in result.stdout


def _logged(stream) -> None:
    """Two progress lines of a stream's write and the step's end, as stage 1 logs them."""
    import logging

    from runtime import log

    handler = log._Console()
    handler.stream = stream
    logger = logging.getLogger("resin-migrate-test-console")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        logger.info("writing flash-rootA: %d%%", 40, extra=log.PROGRESS)
        logger.info("writing flash-rootA: %d%%", 100, extra=log.PROGRESS)
        logger.info("step write:flash-rootA done")
    finally:
        logger.removeHandler(handler)


def test_progress_rewrites_its_line_on_a_terminal_and_not_in_a_pipe() -> None:
    import io
    import os
    import pty

    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as terminal:
        _logged(terminal)
    shown = os.read(master, 4096).decode()
    os.close(master)
    # the terminal's line discipline turns each newline into CR LF
    assert shown == ("\r\x1b[Kwriting flash-rootA: 40%\r\x1b[Kwriting flash-rootA: 100%"
                     "\r\nstep write:flash-rootA done\r\n"), repr(shown)
    piped = io.StringIO()
    _logged(piped)
    assert piped.getvalue() == ("writing flash-rootA: 40%\nwriting flash-rootA: 100%\n"
                                "step write:flash-rootA done\n")
