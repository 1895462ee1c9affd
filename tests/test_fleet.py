"""deploy/ansible without VMs: the playbook's syntax, the report's merge, and the role on
this machine (a local connection) in both of its modes, refused by check on a sysroot that
is no device. The migrations themselves: tests/fleet.py in the VMs (`invoke e2e --scenario
fleet`, and in the default run through tests/test_e2e.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE = ROOT / "deploy" / "ansible"
BIN = Path(sys.executable).parent
REPORT_SCRIPT = ANSIBLE / "roles" / "resin_migrate" / "files" / "fleet_report.py"


def _playbook(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCAL_TEMP": str(cwd / "ansible-tmp"),
           "ANSIBLE_REMOTE_TEMP": str(cwd / "ansible-remote-tmp"), "LC_ALL": "C.UTF-8"}
    return subprocess.run([str(BIN / "ansible-playbook"), *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def test_the_playbook_and_the_example_inventory_parse(tmp_path: Path) -> None:
    result = _playbook("-i", str(ANSIBLE / "inventory.example.yml"), "--syntax-check",
                       str(ANSIBLE / "migrate.yml"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_report_has_every_host_of_the_play(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    records = tmp_path / "report.json.d"
    records.mkdir()
    (records / "a.json").write_text(json.dumps({
        "host": "a", "result": "confirmed", "reason": None,
        "times": {"started": "100", "ended": "460"}}))
    (records / "old.json").write_text(json.dumps({"host": "old", "result": "refused",
                                                  "reason": "swap is a file", "times": {}}))
    subprocess.run([sys.executable, str(REPORT_SCRIPT), str(report), json.dumps(["a", "b"])],
                   check=True)
    found = json.loads(report.read_text())
    rows = {row["host"]: row for row in found["hosts"]}
    assert found["report_version"] == 1
    assert found["summary"] == {"confirmed": 1, "not-attempted": 1, "refused": 1}
    assert rows["a"]["times"] == {"started": 100, "ended": 460, "seconds": 360}
    assert rows["b"]["result"] == "not-attempted" and rows["b"]["in_play"]
    # a record of an earlier run stays: where that device stands
    assert rows["old"]["reason"] == "swap is a file" and not rows["old"]["in_play"]
    assert oct(report.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("mode", ["modules", "raw"])
def test_a_refusal_by_check_fails_the_host_and_leaves_nothing(
        mode: str, tmp_path: Path, synthetic_bundle: Path) -> None:
    """The role on this machine, its runtime pointed at an empty sysroot: check refuses, the
    host fails (ansible-playbook exits 2), the report holds check's reasons, and the
    directory the role copied the bundle into is gone again."""
    sysroot = tmp_path / "sysroot"
    (sysroot / "etc").mkdir(parents=True)
    remote = tmp_path / "device-bundle"
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"devices": {"hosts": {"here": {
        "ansible_connection": "local", "ansible_become": False,
        "ansible_python_interpreter": sys.executable,
        "resin_migrate_mode": mode,
        "resin_migrate_python": "/usr/bin/python3",
        "resin_migrate_bundle_dir": str(synthetic_bundle),
        "resin_migrate_remote_dir": str(remote),
        "resin_migrate_runtime_args": ["--sysroot", str(sysroot)],
        "resin_migrate_report": str(tmp_path / "report.json"),
    }}}}))
    result = _playbook("-i", str(inventory), str(ANSIBLE / "migrate.yml"), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    report = json.loads((tmp_path / "report.json").read_text())
    row = report["hosts"][0]
    assert (row["host"], row["result"], row["exit_code"], row["mode"]) == (
        "here", "refused", 10, mode), row
    assert row["check"]["failed"] and row["reason"].startswith(row["check"]["failed"][0]["name"])
    assert "refused by check" in output
    assert not remote.exists(), sorted(p.name for p in remote.iterdir())
