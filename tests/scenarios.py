"""The end-to-end scenarios `invoke e2e` runs, by name, each in a work directory of its own.

The work is in tests/e2e.py (one migration, the fallback), tests/fleet.py (the playbook on
three VMs) and tests/powercut.py (cuts and hangs); this module picks them by name, gives
each its work directory and a progress printer, and says what each showed or why it failed.
`invoke e2e` (tasks.py) parses its options and calls main().
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.e2e import (
    OLDTOOLS_SPEC,
    E2EError,
    StaticNetwork,
    fallback,
    legacy_for,
    migrate,
    table_text,
)
from tests.releases import RELEASES
from tests.rig.bootimages import OLDER_RELEASE
from tests.rig.legacy import LegacySpec, SwapPlacement

Say = Callable[[str], None]


class UsageError(ValueError):
    """A scenario, release row or instant that does not exist (invoke's exit code 2)."""


def say_as(prefix: str) -> Say:
    """A progress callback printing "PREFIX: text" at once."""
    def say(text: str) -> None:
        print(f"{prefix}: {text}", flush=True)
    return say


def _swap_as(placement: SwapPlacement) -> Callable[[Path, Say], str]:
    """The plain migration of a legacy disk whose swap is placed so."""
    def scenario(work: Path, say: Say) -> str:
        migrated = migrate(LegacySpec(placement=placement), work, progress=say)
        return f"migrated (the bundle build included)\n{migrated.summary()}"
    return scenario


def _fallback(work: Path, say: Say) -> str:
    result = fallback(LegacySpec(), work, progress=say)
    return (f"stage 2 refused, the legacy system came back, rollback restored the swap "
            f"({result.swaps_after})")


def _static(work: Path, say: Say) -> str:
    migrated = migrate(LegacySpec(), work, network=StaticNetwork(), progress=say)
    return f"migrated; resin-boot holds {', '.join(sorted(migrated.keyfiles))}\n" \
           f"{migrated.summary()}"


def _older(work: Path, say: Say) -> str:
    migrated = migrate(LegacySpec(), work, release=OLDER_RELEASE, progress=say)
    return f"migrated with the {OLDER_RELEASE.name} flasher\n{migrated.summary()}"


def _oldtools(work: Path, say: Say) -> str:
    migrated = migrate(OLDTOOLS_SPEC, work, old_tools=True, progress=say)
    said = [line for _, line in migrated.boot.serial1
            if line.startswith(("E2E tool ", "E2E locale", "E2E python3"))]
    return (f"migrated; {'; '.join(said)}\n  legacy table: "
            f"{table_text(migrated.tables['legacy'])}\n  final table: "
            f"{table_text(migrated.tables['final'])}\n{migrated.summary()}")


def _fleet(work: Path, say: Say) -> str:
    from tests.fleet import run_fleet  # imports Ansible's pieces only when asked for

    fleet = run_fleet(work, progress=say)
    return (f"the playbook ran (the bundle build included):\n{fleet.summary()}\n  report: "
            f"{json.dumps(fleet.report['summary'], sort_keys=True)}")


#: name -> the scenario: it returns what it showed, or raises E2EError naming the phase.
SCENARIOS: dict[str, Callable[[Path, Say], str]] = {
    "primary": _swap_as(SwapPlacement.PRIMARY), "logical": _swap_as(SwapPlacement.LOGICAL),
    "fallback": _fallback, "static": _static, "older": _older, "oldtools": _oldtools,
    "fleet": _fleet,
}


@contextmanager
def _workdir(name: str, keep: bool) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix=f"resin-migrate-e2e-{name}-"))
    try:
        yield work
    finally:
        if keep:
            print(f"{name}: work directory kept: {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_scenarios(names: list[str], keep: bool) -> bool:
    """The named scenarios one after the other; False when one failed (it said why)."""
    ok = True
    for name in names:
        started = time.monotonic()
        with _workdir(name, keep) as work:
            try:
                shown = SCENARIOS[name](work, say_as(name))
                print(f"{name}: {time.monotonic() - started:.0f} s in all; {shown}", flush=True)
            except E2EError as exc:
                ok = False
                print(f"{name}: FAILED after {time.monotonic() - started:.0f} s\n{exc}",
                      file=sys.stderr, flush=True)
    return ok


MATRIX_COLUMNS = ("stage 1", "flasher boot", "stage 2 (checks and write)", "first resinOS boot",
                  "downtime", "total")


def release_matrix(names: list[str], keep: bool) -> bool:
    """Release rows (default: every one) migrated once each (primary swap), then a table of
    the phase times; False when a row failed."""
    unknown = sorted(set(names) - set(RELEASES))
    if unknown:
        raise UsageError(f"no release row {', '.join(unknown)}; rows: {', '.join(RELEASES)}")
    rows: dict[str, dict[str, float] | str] = {}
    for name, release in RELEASES.items():
        if names and name not in names:
            continue
        label = f"matrix {name}"
        started = time.monotonic()
        with _workdir(f"matrix-{name}", keep) as work:
            try:
                result = migrate(legacy_for(release), work, release=release,
                                 progress=say_as(label))
                total = time.monotonic() - started
                rows[name] = {**result.durations(), "total": total}
                print(f"{label}: migrated in {total:.0f} s\n{result.summary()}", flush=True)
            except E2EError as exc:
                rows[name] = f"FAILED in phase {exc.phase}"
                print(f"{label}: FAILED\n{exc}", file=sys.stderr, flush=True)
            except Exception as exc:  # noqa: BLE001 - a row's error must not hide the others
                rows[name] = f"FAILED: {type(exc).__name__}"
                print(f"{label}: FAILED before the VM ran: {exc}", file=sys.stderr,
                      flush=True)
    print("\n| row | " + " | ".join(MATRIX_COLUMNS) + " |\n|---|" + "---|" * len(MATRIX_COLUMNS))
    for name, row in rows.items():
        cells = ([f"{row.get(column, 0):.0f} s" for column in MATRIX_COLUMNS]
                 if isinstance(row, dict) else [row] + [""] * (len(MATRIX_COLUMNS) - 1))
        print(f"| {name} | " + " | ".join(cells) + " |")
    return not any(isinstance(row, str) for row in rows.values())


def powercut_matrix(names: list[str], keep: bool) -> bool:
    """Power cuts and hangs at the named instants (default: all; ["list"] prints their
    names), then the table; False when an instant did not end in resinOS or the old
    system."""
    from tests.powercut import instants, run_matrix, table

    if names == ["list"]:
        print("\n".join(instants(None)))
        return True
    started = time.monotonic()
    with _workdir("powercut", keep) as work:
        try:
            rows = run_matrix(names, work, keep=keep)
        except KeyError as exc:
            raise UsageError(exc.args[0]) from None
    print(f"\n{table(rows)}\n\n{len(rows)} instants in {time.monotonic() - started:.0f} s")
    return not any(isinstance(row, str) for row in rows)


def main(scenario: str, keep: bool, rows: str = "", instants: str = "") -> bool:
    """invoke e2e: one scenario, all of SCENARIOS, the release matrix or the power-cut
    matrix. UsageError for a name that does not exist; False when something failed."""
    if scenario == "matrix":
        return release_matrix([row.strip() for row in rows.split(",") if row.strip()], keep)
    if scenario == "powercut":
        return powercut_matrix([name.strip() for name in instants.split(";") if name.strip()],
                               keep)
    if scenario == "all":
        return run_scenarios(list(SCENARIOS), keep)
    if scenario not in SCENARIOS:
        raise UsageError(f"unknown scenario {scenario!r}; choose one of "
                         f"{', '.join(SCENARIOS)}, all, matrix or powercut")
    return run_scenarios([scenario], keep)
