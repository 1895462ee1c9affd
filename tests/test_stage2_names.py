"""Stage 2 (bash) keeps its own copies of the names it shares with stage 1: the files on
flash-data, the phases, the bound on boots. They must be runtime/stage2names.py's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from runtime import stage2names

STAGE2 = Path(__file__).resolve().parent.parent / "runtime" / "resin-migrate-stage2"
#: the script's variable -> stage2names' attribute
SHARED = {
    "ENV_NAME": "ENV_NAME",
    "JOURNAL_NAME": "JOURNAL_NAME",
    "LOG_NAME": "LOG_NAME",
    "BOOT_LOG_NAME": "BOOT_LOG_NAME",
    "ARMED_MBR_NAME": "ARMED_MBR_NAME",
    "SAVED_MBR_NAME": "SAVED_MBR_NAME",
    "FAULTS_NAME": "FAULTS_NAME",
    "PHASES": "PHASES",
    "MAX_BOOTS": "MAX_BOOTS",
    "WRITE_TRIES": "WRITE_TRIES",
}


def script_values() -> dict[str, str]:
    """The script's top-level assignments NAME=value, as the shell reads them."""
    found: dict[str, str] = {}
    for line in STAGE2.read_text().splitlines():
        match = re.match(r"^([A-Z][A-Z0-9_]*)=(\S.*)$", line)
        if match and match.group(1) not in found:
            words = shlex.split(match.group(2), comments=True)
            found[match.group(1)] = words[0] if words else ""
    return found


@pytest.mark.parametrize(("variable", "attribute"), SHARED.items())
def test_stage2_copies_the_shared_names(variable: str, attribute: str) -> None:
    values = script_values()
    assert variable in values, f"{STAGE2.name} does not set {variable}"
    expected = getattr(stage2names, attribute)
    if isinstance(expected, tuple):
        assert tuple(values[variable].split()) == expected
    else:
        assert values[variable] == str(expected)


def test_the_phases_stage2_runs_are_its_functions() -> None:
    text = STAGE2.read_text()
    for phase in stage2names.PHASES:
        assert re.search(rf"^phase_{phase.replace('-', '_')}\(\) {{$", text, re.M), phase


def test_every_name_of_stage2names_is_pinned() -> None:
    public = {name for name in vars(stage2names) if name.isupper()}
    # the Python side's own: stage 1's log name and the default deadline (a stage2.env value)
    assert public - set(SHARED.values()) == {"STAGE1_LOG_NAME", "GUARD_TIMEOUT"}
