"""What invoke demo and invoke e2e print while a migration runs (no VM): each step as it
starts and ends, each boot phase as its marker arrives on the serial port."""

from __future__ import annotations

from tests.e2e import MILESTONES, PhasePrinter, Steps


def test_steps_say_each_start_and_end_once() -> None:
    said: list[str] = []
    steps = Steps(said.append)
    steps.start("building the bundle", "the 6.10 flasher")
    steps.start("preparing the disk")
    steps.end("resinOS reported")
    steps.end()
    assert said == ["building the bundle (the 6.10 flasher) ...",
                    "building the bundle: done in 0 s",
                    "preparing the disk ...",
                    "preparing the disk: resinOS reported after 0 s"]


def test_boot_phases_are_said_as_their_markers_arrive() -> None:
    said: list[str] = []
    printer = PhasePrinter(said.append)
    printer(3.2, "login: root (automatic login)")
    printer(12.0, f"[ 9.1] {MILESTONES[0][1]}")
    printer(140.4, f"resin-migrate: {MILESTONES[1][1]} now")
    printer(141.0, f"again: {MILESTONES[1][1]}")     # a marker is said once
    assert said == [f"  12 s  {MILESTONES[0][0]}; next: {MILESTONES[1][0]}",
                    f" 140 s  {MILESTONES[1][0]}, 128 s after {MILESTONES[0][0]}; "
                    f"next: {MILESTONES[2][0]}"]
    for number, (_, marker) in enumerate(MILESTONES[2:], start=2):
        printer(200.0 + number, marker)
    assert said[-1] == (f" 206 s  {MILESTONES[-1][0]}, 1 s after {MILESTONES[-2][0]}")
    assert len(said) == len(MILESTONES)
