"""invoke tasks: parse, call, print. The work happens in builder/ and runtime/."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from invoke import Exit, task

ROOT = Path(__file__).resolve().parent


def _build(image: Path, out: Path, *options: str) -> None:
    """build-flasher (builder/cli.py); an invoke Exit with its code when it fails (it has
    printed why)."""
    from builder.cli import main

    code = main(["--image", str(image), "--out", str(out), *options])
    if code:
        raise Exit(code=code)


@task(help={
    "image": "(required) the intel-nuc flasher image: raw, .zip (balena's download), .gz, "
             ".zst or .xz; the format is read from the content, not the name",
    "out": "(required) the bundle directory to create (refused if it exists and is not empty)",
    "config": "the fleet's config.json; replaces the flasher's own on flash-boot",
    "network": "a directory of NetworkManager keyfiles for flash-boot/system-connections",
    "compression": "zstd or gzip for the resinOS image inside the flasher (default: zstd "
                   "when the flasher's root filesystem has a zstd binary, else gzip)",
    "stream-compression": "gzip (default; the runtime decompresses it with Python's zlib) or "
                          "zstd (needs a zstd binary on the device)",
    "force": "replace the contents of a non-empty --out",
    "quiet": "no progress bars",
    "workdir": "where to keep the temporary copies (default: beside --out); needs about "
               "twice the flasher's raw size free",
    "verbose": "print every command run (with its exit code and stderr when it fails)",
})
def build_flasher(c, image=None, out=None, config=None, network=None, compression=None,
                  stream_compression="gzip", force=False, quiet=False, workdir=None,
                  verbose=False):
    """Repack an intel-nuc resinOS flasher image into a migration bundle (no root needed).

    The same as `python -m builder` (builder/cli.py, whose --help has the whole story). The
    bundle holds manifest.json, one compressed stream per partition the device needs
    (flash-boot, flash-rootA), resin-migrate.pyz and SHA256SUMS. Exit codes: 0 bundle written;
    1 a bug; 3 unreadable input; 4 not an intel-nuc flasher; 5 bad option or --out not empty;
    6 a tool missing or failed; 7 an edit could not be verified; 8 a file could not be read or
    written (disk full, permissions).
    """
    missing = [name for name, value in (("--image", image), ("--out", out)) if not value]
    if missing:
        raise Exit(f"build-flasher: {' and '.join(missing)} required; see "
                   "'invoke build-flasher --help'", code=5)
    options = [*(["--config", config] if config else []),
               *(["--network", network] if network else []),
               *(["--compression", compression] if compression else []),
               "--stream-compression", stream_compression,
               *(["--workdir", workdir] if workdir else []),
               *(["--force"] if force else []), *(["--quiet"] if quiet else []),
               *(["--verbose"] if verbose else [])]
    _build(Path(image), Path(out), *options)


@task(help={"out": "bundle directory (default: dist/demo; replaced if present)",
            "quiet": "no progress bars",
            "bundle_only": "only build and verify the bundle; do not boot the demo VM"})
def demo(c, out="dist/demo", quiet=False, bundle_only=False):
    """The main job on the synthetic images: repack the flasher, then migrate a demo VM.

    1. builds the synthetic intel-nuc flasher the tests use (no real image needed) and
       repacks it with build-flasher into --out, then checks it with resin-migrate.pyz verify;
    2. as root with QEMU: boots a legacy Debian VM (BIOS, GRUB2, swap partition) and migrates
       it end to end to the bootable resinOS stand-in, printing each phase and the downtime.
    """
    import shutil
    import tempfile

    sys.path.insert(0, str(ROOT))
    from tests.synthetic import cached_flasher

    print("demo: no real flasher image given; using the SYNTHETIC intel-nuc flasher that the "
          "tests build (same table, labels and files as a real one; not a real resinOS)")
    image = cached_flasher()
    print(f"demo: synthetic flasher: {image}")
    config = ROOT / "tests" / "data" / "config.json"
    from runtime.manifest import RUNTIME_NAME

    _build(image, Path(out), "--config", str(config), "--force", *(["--quiet"] if quiet else []))
    c.run(f"{sys.executable} {Path(out) / RUNTIME_NAME} verify", pty=False)
    if bundle_only:
        return
    missing = []
    if os.geteuid() != 0:
        missing.append("root (loop devices, mounts)")
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("QEMU (./setup.sh installs it)")
    if missing:
        print(f"demo: not migrating the demo VM: it needs {' and '.join(missing)}")
        return
    from tests.e2e import E2EError, migrate
    from tests.rig.legacy import LegacySpec
    from tests.scenarios import say_as

    print("demo: migrating a legacy Debian VM end to end with a bundle of the bootable "
          "SYNTHETIC flasher (QEMU in software emulation; the first run builds a Debian root "
          "with debootstrap, then takes a few minutes)")
    work = Path(tempfile.mkdtemp(prefix="resin-migrate-demo-"))
    started = time.monotonic()
    try:
        result = migrate(LegacySpec(), work, progress=say_as("demo"))
    except E2EError as exc:
        raise Exit(f"demo: {exc}", code=1) from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = result.report
    print(f"demo: migrated in {time.monotonic() - started:.0f} s; resinOS reported labels "
          f"{', '.join(report.labels) if report else '?'}, the fleet's config.json and the "
          f"backup of /srv/appdata")
    print(result.summary())


@task(help={"scenario": "primary, logical, fallback, static, older (the 2.51 flasher), "
                        "oldtools (p1 at sector 63, logical swap, no sfdisk or lsblk in the "
                        "guest, stage 1 under LANG=C), fleet (deploy/ansible's playbook on "
                        "three VMs in two waves, one refused: tests/fleet.py), all "
                        "(default: those seven), matrix "
                        "(every release row of tests/releases.py, one migration each) or "
                        "powercut (power cuts and hangs at every instant of a migration, "
                        "tests/powercut.py)",
            "rows": "with --scenario matrix: the release rows to migrate, comma-separated "
                    "(default: all)",
            "instants": "with --scenario powercut: the instants to run, by name, separated "
                        "by ';' (default: all; --instants list prints them)",
            "keep": "keep the work directory (disk images, serial logs) and print its path"})
def e2e(c, scenario="all", keep=False, rows="", instants=""):
    """Migrate legacy Debian VMs end to end under QEMU (root; several minutes each).

    Prints each step and boot phase as it starts and ends, each phase's duration and the
    downtime (from the reboot at the end of stage 1 to the resinOS report). Exits 1 naming
    the phase that failed, with the serial tails; 2 for a name that does not exist. The
    scenarios are in tests/scenarios.py.
    """
    sys.path.insert(0, str(ROOT))
    from tests import scenarios

    try:
        ok = scenarios.main(scenario, keep=keep, rows=rows, instants=instants)
    except scenarios.UsageError as exc:
        raise Exit(f"e2e: {exc}", code=2) from None
    if not ok:
        raise Exit(f"e2e: {scenario}: something failed (above)", code=1)


@task(help={"repeat": "rounds of each timed figure (default 3; the median is reported)",
            "build_repeat": "builder runs (default 1: a build takes minutes)",
            "json": "also write every figure and sample to this JSON file",
            "only": "comma-separated parts: build,final,stage1,memory (default: all); without "
                    "build, the bundle of an earlier run is measured"})
def bench(c, repeat=3, build_repeat=1, json=None, only="build,final,stage1,memory"):
    """Measure the final write, stage 1's stream-write, the bundle's size and peak memory,
    each against its baseline in the same run (needs root: loop devices, page cache drops).

    The first run builds a 1.8 GB resinOS-shaped image from this machine's /usr files, a
    flasher around it and the baselines' sizes (gzip -9, xz -6), all cached under
    /var/cache/resin-migrate/bench; later runs take a few minutes.
    """
    from tests.bench.run import main

    code = main(repeat=int(repeat), build_repeat=int(build_repeat),
                json_path=Path(json) if json else None,
                only=tuple(part.strip() for part in only.split(",") if part.strip()))
    if code:
        raise Exit(code=code)


# The runtime's own tests run twice more: on the oldest CPython pyenv holds here (Ubuntu
# 18.04's generation; its virtualenv with pytest is made by setup.sh), and under the C
# locale with UTF-8 mode off, as services and cron jobs run it (Python before 3.7 then
# reads and writes ASCII; PYTHONUTF8=0 makes a newer one do the same).
OLD_PYTHON = "3.6.15"
OLD_VENV = ROOT / ".venv-py36"
C_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}
# The files whose tests import runtime/ in-process and load on Python 3.6 through
# tests/oldpython.py; their tests that need a bundle are deselected there (the builder
# needs 3.9). Not here: test_layout, test_blockmap, test_bootcfg, test_release,
# test_formats and test_build* import builder/ (3.8 syntax, pyparted); test_tools reads the
# runtime's sources with the ast of 3.8 and later; test_stage1 and test_stage2 need a bundle
# in every test (a few of them below, through the zipapp).
RUNTIME_UNIT_TESTS = ("tests/test_locale.py", "tests/test_manifest.py", "tests/test_plan.py",
                      "tests/test_mbr.py", "tests/test_preflight.py", "tests/test_stream.py",
                      "tests/test_network.py", "tests/test_download.py",
                      "tests/test_stage2_names.py", "tests/test_cli.py")
# A representative few of the loop-device tests that run the zipapp with
# RESIN_MIGRATE_TEST_PYTHON (all of them take about 15 minutes; these about 2): the whole
# of stage 1 and rollback on the logical-swap layout (Ubuntu's default), a resumed stage 1
# (the state file), check and stage1 refusing (every check's output), the network carried
# into flash-data, and a bundle fetched over HTTPS (the old ssl module).
RUNTIME_ZIPAPP_TESTS = ("tests/test_stage1.py::test_stage1_then_rollback[logical]",
                        "tests/test_stage1.py::test_interrupted_stage1_resumes",
                        "tests/test_stage1.py::test_refusals_change_nothing[corrupt-stream]",
                        "tests/test_network.py::test_stage1_writes_keyfiles_to_flash_data",
                        "tests/test_download.py::test_stage1_from_https")


def _pyenv_root() -> Path:
    import shutil
    import subprocess

    if os.environ.get("PYENV_ROOT"):
        return Path(os.environ["PYENV_ROOT"])
    pyenv = shutil.which("pyenv")
    if pyenv:
        found = subprocess.run([pyenv, "root"], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip():
            return Path(found.stdout.strip())
    return Path.home() / ".pyenv"


def _counts(output: str) -> str:
    """pytest's closing counts ('171 passed, 14 deselected'), from its output."""
    import re

    for line in reversed(output.splitlines()):
        match = re.search(r"((?:\d+ \w+)(?:, \d+ \w+)*|no tests ran) in [\d.]+s", line)
        if match:
            return match.group(1)
    return "no pytest summary"


def _runtime_runs(c, both_locales: bool) -> tuple[list[str], list[str]]:
    """The runtime's tests on OLD_PYTHON under C_LOCALE, and with both_locales under the
    environment's locale first: (a line per run, failures)."""
    import shlex
    import shutil
    import tempfile

    old_python = _pyenv_root() / "versions" / OLD_PYTHON / "bin" / "python3"
    old_venv = OLD_VENV / "bin" / "python"
    lines: list[str] = []
    failed: list[str] = []
    # (what, the python running the unit tests, the one running the zipapp or "", env)
    runs: list[tuple[str, str, str, dict[str, str]]] = []
    if old_python.exists() and old_venv.exists():
        if both_locales:
            runs.append((f"Python {OLD_PYTHON}", str(old_venv), str(old_python), {}))
        # the C locale on the old interpreter is the harder of the two (ASCII file names and
        # output before 3.7), so the one run of the default; the main suite runs the same
        # tests under this machine's UTF-8 locale
        runs.append((f"Python {OLD_PYTHON}, LC_ALL=C PYTHONUTF8=0", str(old_venv),
                     str(old_python), C_LOCALE))
    else:
        missing = f"{old_python} is missing" if not old_python.exists() else \
            f"{old_venv} is missing (./setup.sh makes it)"
        if os.environ.get("CI", "").lower() == "true":
            failed.append(f"Python {OLD_PYTHON}")
            lines.append(f"Python {OLD_PYTHON}: FAILED: CI=true and {missing}")
        else:
            lines.append(f"Python {OLD_PYTHON}: skipped: {missing}")
        runs.append(("LC_ALL=C PYTHONUTF8=0", sys.executable, "", C_LOCALE))
    for what, python, device_python, env in runs:
        print(f"\ntest: the runtime's tests, {what}", flush=True)
        work = Path(tempfile.mkdtemp(prefix="resin-migrate-test-"))
        ok = True
        for part, argv, extra in (
                ("unit", [python, "-m", "pytest", "-p", "tests.oldpython",
                          "-W", "ignore:Unknown config option", *RUNTIME_UNIT_TESTS], {}),
                ("zipapp", [sys.executable, "-m", "pytest", *RUNTIME_ZIPAPP_TESTS],
                 {"RESIN_MIGRATE_TEST_PYTHON": device_python} if device_python else {})):
            argv += ["-q", "-p", "no:cacheprovider", "--basetemp", str(work / part)]
            with c.cd(str(ROOT)):
                result = c.run(" ".join(shlex.quote(arg) for arg in argv), pty=False,
                               warn=True, env={**env, **extra})
            lines.append(f"{what}, {part} tests: {_counts(result.stdout)}"
                         f"{'' if result.ok else ' (FAILED)'}")
            ok = ok and result.ok
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            failed.append(what)
            lines.append(f"  (the failed tests' directories are under {work})")
    return lines, failed


@task(help={"args": "extra pytest arguments, e.g. '-k formats' or '-m loop'",
            "runtime": "first, the runtime's tests on Python 3.6.15 under LC_ALL=C "
                       "PYTHONUTF8=0 (default; --no-runtime skips them)",
            "runtime_only": "only those runs, not the whole suite",
            "both_locales": "run them on 3.6.15 under the environment's locale too"})
def test(c, args="", runtime=True, runtime_only=False, both_locales=False):
    """Run the test suite (unit tests; loop and VM tests run when the machine allows).

    Before it, the runtime's own tests (RUNTIME_UNIT_TESTS in-process, RUNTIME_ZIPAPP_TESTS
    through the zipapp) on Python 3.6.15 under LC_ALL=C PYTHONUTF8=0 (with --both-locales
    under the environment's locale too), each run's counts printed; any failure fails the
    task. A missing 3.6.15 is skipped with a line, and fails with CI=true.
    """
    lines: list[str] = []
    failed: list[str] = []
    if runtime or runtime_only:
        started = time.monotonic()
        lines, failed = _runtime_runs(c, both_locales)
        print(f"\ntest: the runtime's tests in {time.monotonic() - started:.0f} s:\n  "
              + "\n  ".join(lines), flush=True)
        if runtime_only:
            if failed:
                raise Exit(f"test: the runtime's tests failed: {', '.join(failed)}", code=1)
            return
    result = c.run(f"{sys.executable} -m pytest {args}", pty=False, warn=True)
    if failed:
        raise Exit(f"test: the runtime's tests failed: {', '.join(failed)} (the counts are "
                   "printed before the suite's)", code=1)
    if not result.ok:
        raise Exit(code=result.exited)


@task
def lint(c):
    """ruff, mypy, vermin (runtime/ stays on Python 3.4) and shellcheck (stage 2)."""
    os.chdir(ROOT)
    c.run(f"{sys.executable} -m ruff check .")
    c.run(f"{sys.executable} -m mypy")
    vermin = Path(sys.executable).parent / "vermin"
    c.run(f"{vermin} --target=3.4- --violations --no-tips --eval-annotations runtime")
    c.run("shellcheck runtime/resin-migrate-stage2 deploy/ansible/confirm-ssh-port.sh")
