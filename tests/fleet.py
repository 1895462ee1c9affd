"""The fleet scenario: deploy/ansible's playbook migrates three legacy VMs in two waves.

    result = run_fleet(workdir)          # raises E2EError naming the host and the phase
    print(result.summary())

Three QEMU VMs boot bootable legacy disks (tests.rig.bootable) with QEMU's user networking:
each guest's systemd-networkd takes its address by DHCP, its sshd is reached on a port of
127.0.0.1, and root's authorized key is one made for the run. ansible-playbook (ansible-core
from the dev extras) runs deploy/ansible/migrate.yml on an inventory naming them, with
serial [1, 2] and max_fail_percentage 50, as a fleet operator would:

- device-a: the default legacy disk (a primary swap), driven by Ansible's modules (the
  bundle copied with checksums, stage 1 an async job), alone in the first wave;
- device-b: OLDTOOLS_SPEC's disk (p1 at sector 63, a logical swap in DOS cylinders) with no
  sfdisk and no lsblk, driven by raw and script tasks as the role drives a device whose
  Python the modules cannot run on (Ubuntu 14.04, 16.04), the runtime under LANG=C, the
  streams downloaded by stage 1 from an HTTPS server on this host (--bundle-url, the test
  CA by --ca-file);
- device-c: its swap is a file, which check refuses: the host fails, nothing changes on it.

b and c form the second wave, which starts only once a is confirmed. The confirmation hook
is a small local check, the stand-in's report in the VM's serial log. Afterwards the JSON
report must say a and b confirmed and c refused with check's reason, a's and b's disks must
be resinOS's (the checks of tests/e2e.py: the report, the tables, no secret in the former
swap area), c's table, fstab and root must show no trace of stage 1 or of the bundle.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e import (
    LATE_FILE,
    LATE_TEXT,
    OLD_TOOLS,
    OLDTOOLS_SPEC,
    E2EError,
    Steps,
    Table,
    build_bundle,
    check_legacy_table,
    check_report,
    check_secrets_wiped,
    check_tables,
    table_text,
)
from tests.httpserver import BundleServer, make_ca, make_server_cert
from tests.rig.bootable import BootResult, boot, bootable_legacy_image
from tests.rig.bootimages import FLASHER_RELEASE, parse_report
from tests.rig.legacy import (
    APPDATA_DIR,
    LegacySpec,
    attached,
    backup_script_text,
    mounted_root,
)

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOK = ROOT / "deploy" / "ansible" / "migrate.yml"
SERIAL = [1, 2]
MAX_FAIL_PERCENTAGE = 50
REPORT_END = "RESINOS-REPORT end"
#: QEMU's user networking: the guest reaches this host's 127.0.0.1 as 10.0.2.2
HOST_FROM_GUEST = "10.0.2.2"
VM_TIMEOUT = 2700           # seconds, per VM: its boot, the play, the migration
SSH_TIMEOUT = 600           # for sshd to answer after the boot
PLAY_TIMEOUT = 2400
NETWORK_UNIT = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n"
# what the role's runtime on device-b gets: LANG=C, LC_ALL and LC_CTYPE empty (unset in
# effect), whatever the SSH client forwards
OLD_LOCALE = {"LANG": "C", "LC_ALL": "", "LC_CTYPE": ""}
# the runtime's traces in the old root; and the role's bundle directory
TRACES = ("var/lib/resin-migrate", "var/log/resin-migrate.log", "etc/grub.d/42_resin-migrate",
          "var/lib/resin-migrate-bundle")


@dataclass(frozen=True)
class FleetHost:
    name: str
    spec: LegacySpec
    mode: str                   # the role's resin_migrate_mode
    suitable: bool = True
    old_tools: bool = False     # OLD_TOOLS removed from the guest
    bundle_url: bool = False    # stage 1 downloads the streams (--bundle-url)


HOSTS = (
    FleetHost("device-a", LegacySpec(), "modules"),
    FleetHost("device-b", OLDTOOLS_SPEC, "raw", old_tools=True, bundle_url=True),
    FleetHost("device-c", LegacySpec(with_swap_partition=False), "modules", suitable=False),
)


@dataclass
class Machine:
    host: FleetHost
    disk: Path
    port: int
    logs: Path
    table: Table = field(default_factory=dict)
    root_before: dict[str, bytes] = field(default_factory=dict)
    result: BootResult | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def ssh(self, key: Path, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ssh", *_ssh_options(key), "-p", str(self.port), "root@127.0.0.1", command],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@dataclass
class FleetResult:
    report: dict
    machines: list[Machine]
    play_seconds: float
    recap: list[str]

    def summary(self) -> str:
        lines = [f"  play: {self.play_seconds:.0f} s (serial {SERIAL}, max_fail_percentage "
                 f"{MAX_FAIL_PERCENTAGE})"]
        for row in self.report["hosts"]:
            times = row.get("times", {})
            lines.append(f"  {row['host']}: {row['result']} (mode {row.get('mode')}, "
                         f"{times.get('seconds', '?')} s in the play)"
                         + (f": {row['reason']}" if row.get("reason") else ""))
        for machine in self.machines:
            if machine.result is not None:
                lines.append(f"  {machine.host.name} VM: {machine.result.reason} after "
                             f"{machine.result.seconds:.0f} s")
        return "\n".join(lines)


def _ssh_options(key: Path) -> list[str]:
    return ["-i", str(key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
            "-o", "LogLevel=ERROR"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _root_files(root: Path) -> dict[str, bytes]:
    """The old root's files stage 1 would touch, to compare after a refusal."""
    return {name: (root / name).read_bytes() for name in ("etc/fstab", "boot/grub/grub.cfg",
                                                          "boot/grub/grubenv")}


def prepare(host: FleetHost, workdir: Path, public_key: str) -> Machine:
    """A throwaway copy of the host's bootable legacy disk, reachable by SSH with the run's
    key and configured for DHCP; without OLD_TOOLS for old_tools."""
    disk = workdir / f"{host.name}.img"
    subprocess.run(["cp", "--sparse=always", str(bootable_legacy_image(host.spec)), str(disk)],
                   check=True)
    machine = Machine(host=host, disk=disk, port=_free_port(), logs=workdir / host.name)
    machine.logs.mkdir()
    with attached(disk, host.spec) as dev, mounted_root(dev) as root:
        ssh = root / "root/.ssh"
        ssh.mkdir(mode=0o700, exist_ok=True)
        (ssh / "authorized_keys").write_text(public_key)
        (ssh / "authorized_keys").chmod(0o600)
        network = root / "etc/systemd/network/20-e2e.network"
        network.parent.mkdir(parents=True, exist_ok=True)
        network.write_text(NETWORK_UNIT)
        wants = root / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / "systemd-networkd.service").symlink_to(
            "/lib/systemd/system/systemd-networkd.service")
        if not (wants / "ssh.service").is_symlink():   # absolute: resolved in the guest
            raise E2EError("legacy disk", f"{host.name}: sshd is not enabled in the legacy "
                           "root (openssh-server in tests/rig/rootfs.py)", None)
        (root / "etc/hostname").write_text(host.name + "\n")
        if host.old_tools:
            for tool in OLD_TOOLS:
                for directory in ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin",
                                  "sbin", "bin"):
                    path = root / directory / tool
                    if path.is_symlink() or path.exists():
                        path.unlink()
        machine.root_before = _root_files(root)
    machine.table = check_legacy_table(host.spec, disk)
    return machine


def _start(machine: Machine) -> None:
    def run() -> None:
        try:
            machine.result = boot(machine.disk, timeout=VM_TIMEOUT,
                                  until=REPORT_END if machine.host.suitable else None,
                                  log_dir=machine.logs, ssh_port=machine.port)
        except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
            machine.error = exc

    machine.thread = threading.Thread(target=run, name=machine.host.name, daemon=True)
    machine.thread.start()


def _wait_for_ssh(machines: list[Machine], key: Path) -> None:
    deadline = time.monotonic() + SSH_TIMEOUT
    waiting = list(machines)
    while waiting:
        for machine in list(waiting):
            if machine.error is not None or machine.result is not None:
                why = machine.error or (machine.result.reason if machine.result else "")
                raise E2EError("legacy boot", f"{machine.host.name}'s VM ended before sshd "
                               f"answered: {why}", machine.result)
            if machine.ssh(key, "true", timeout=30).returncode == 0:
                waiting.remove(machine)
        if waiting and time.monotonic() > deadline:
            raise E2EError("legacy boot", "sshd did not answer within "
                           f"{SSH_TIMEOUT} s on {', '.join(m.host.name for m in waiting)}",
                           None)
        time.sleep(3)


def _inventory(machines: list[Machine], workdir: Path, key: Path, bundle: Path,
               bundle_url: str, ca: Path) -> Path:
    script = workdir / "backup.sh"
    script.write_text(backup_script_text(f"/{APPDATA_DIR}"))
    hosts = {}
    for machine in machines:
        values: dict[str, object] = {
            "ansible_host": "127.0.0.1", "ansible_port": machine.port,
            "resin_migrate_mode": machine.host.mode,
            "e2e_serial_log": str(machine.logs / "serial0.log"),
        }
        if machine.host.bundle_url:
            values.update(resin_migrate_bundle_url=bundle_url, resin_migrate_ca_file=str(ca))
        if machine.host.old_tools:
            values["resin_migrate_environment"] = OLD_LOCALE
        hosts[machine.host.name] = values
    late = LATE_TEXT.decode().strip()
    inventory = {"devices": {"hosts": hosts, "vars": {
        "ansible_user": "root",
        "ansible_become": False,
        "ansible_ssh_private_key_file": str(key),
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no "
                                   "-o UserKnownHostsFile=/dev/null",
        "resin_migrate_bundle_dir": str(bundle),
        "resin_migrate_backup_script": str(script),
        # the app's last write, right before the backup: it must reach resinOS
        "resin_migrate_before_backup": f"printf '%s\\n' '{late}' > /{APPDATA_DIR}/{LATE_FILE}",
        "resin_migrate_poll_interval": 5,
        "resin_migrate_confirm_command": f"grep -q '{REPORT_END}' {{{{ e2e_serial_log }}}}",
        "resin_migrate_confirm_timeout": 1200,
        "resin_migrate_confirm_interval": 5,
        "resin_migrate_report": str(workdir / "report.json"),
    }}}
    path = workdir / "inventory.json"
    path.write_text(json.dumps(inventory, indent=2))
    return path


def _play(inventory: Path, workdir: Path, say: Callable[[str], None]) -> tuple[int, str, float]:
    """ansible-playbook's exit code, its output (also in workdir/ansible.log) and seconds;
    say(text) is told of each play and task as it starts."""
    ansible = Path(sys.executable).parent / "ansible-playbook"
    env = {**os.environ, "ANSIBLE_CONFIG": str(PLAYBOOK.parent / "ansible.cfg"),
           "ANSIBLE_HOST_KEY_CHECKING": "False", "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCAL_TEMP": str(workdir / "ansible-tmp"), "LC_ALL": "C.UTF-8"}
    extra = json.dumps({"resin_migrate_serial": SERIAL,
                        "resin_migrate_max_fail_percentage": MAX_FAIL_PERCENTAGE})
    started = time.monotonic()
    timed_out = threading.Event()
    # its own session, so that the watchdog ends the workers too (they hold the pipe open)
    with open(workdir / "ansible.log", "w", buffering=1, encoding="utf-8") as log, \
            subprocess.Popen([str(ansible), "-i", str(inventory), str(PLAYBOOK), "-e", extra],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                             cwd=workdir, text=True, encoding="utf-8", errors="replace",
                             start_new_session=True) as proc:

        def kill() -> None:
            with contextlib.suppress(ProcessLookupError):     # it has ended by itself
                os.killpg(proc.pid, signal.SIGKILL)

        def time_out() -> None:
            timed_out.set()
            kill()

        # the play's own timeouts end it; this one ends a play that hangs all the same
        watchdog = threading.Timer(PLAY_TIMEOUT, time_out)
        watchdog.start()
        try:
            for line in proc.stdout or ():
                log.write(line)
                if line.startswith(("PLAY [", "TASK [")):     # their ends are rows of *
                    header = line.rstrip(" *\n")
                    say(f"{time.monotonic() - started:4.0f} s  {header}")
        except BaseException:       # Ctrl-C does not reach a session of its own
            kill()
            raise
        finally:
            watchdog.cancel()
    output = (workdir / "ansible.log").read_text()
    if timed_out.is_set():
        raise E2EError("playbook", f"ansible-playbook did not end in {PLAY_TIMEOUT} s; killed "
                       f"it:\n{output[-6000:]}", None)
    return proc.returncode, output, time.monotonic() - started


def _stop(machines: list[Machine], key: Path) -> None:
    for machine in machines:
        if machine.thread is not None and machine.thread.is_alive() and not machine.host.suitable:
            machine.ssh(key, "systemctl poweroff", timeout=30)
    for machine in machines:
        if machine.thread is not None:
            machine.thread.join(timeout=VM_TIMEOUT)


def _check_migrated(machine: Machine) -> None:
    result = machine.result
    if result is None or REPORT_END not in result.serial0_text:
        raise E2EError("resinOS report", f"{machine.host.name}: no resinOS report "
                       f"({result.reason if result else machine.error})", result)
    check_report(parse_report(result.serial0_text), result, FLASHER_RELEASE, late_said=False)
    check_tables(machine.disk, FLASHER_RELEASE, result)
    swap = machine.table[machine.host.spec.swap_number or 0]
    check_secrets_wiped(machine.disk, swap, FLASHER_RELEASE, None, result)


def _check_untouched(machine: Machine) -> None:
    """The refused device: the same table (sfdisk), the same fstab and GRUB files, none of
    the runtime's files and not the bundle the role copied."""
    problems = []
    found = check_legacy_table(machine.host.spec, machine.disk)
    if found != machine.table:
        problems.append(f"the table changed: {table_text(found)}")
    with attached(machine.disk, machine.host.spec) as dev, \
            mounted_root(dev, read_only=True) as root:
        changed = [name for name, data in _root_files(root).items()
                   if data != machine.root_before[name]]
        left = [name for name in TRACES if (root / name).exists()]
    problems += [f"{name} changed" for name in changed]
    problems += [f"{name} is on the refused device" for name in left]
    if problems:
        raise E2EError("refused device", f"{machine.host.name}: " + "; ".join(problems),
                       machine.result)


def _check_report(report: dict, machines: list[Machine]) -> None:
    rows = {row["host"]: row for row in report["hosts"]}
    problems = []
    for machine in machines:
        row = rows.get(machine.host.name)
        if row is None:
            problems.append(f"no line for {machine.host.name}")
            continue
        if row.get("mode") != machine.host.mode:
            problems.append(f"{machine.host.name} ran in mode {row.get('mode')}, not "
                            f"{machine.host.mode}")
        if machine.host.suitable:
            if (row["result"], row["confirmed"], row["exit_code"]) != ("confirmed", True, 0):
                problems.append(f"{machine.host.name}: {row['result']}, exit code "
                                f"{row['exit_code']}: {row.get('reason')}")
            elif (row["stage1"] or {}).get("steps_done", [""])[-1:] != ["complete"]:
                problems.append(f"{machine.host.name}: stage 1's steps {row['stage1']}")
        else:
            reasons = " ".join(f"{c['name']}: {c['found']}"
                               for c in (row.get("check") or {}).get("failed", []))
            if row["result"] != "refused" or row["exit_code"] != 10 or \
                    "swap is a file" not in reasons or "swap is a file" not in row["reason"]:
                problems.append(f"{machine.host.name}: {row['result']} (exit code "
                                f"{row['exit_code']}), reason {row.get('reason')!r}, failed "
                                f"checks {reasons!r}: expected check's refusal of the swap "
                                "file")
    # the waves: the second starts after the first device is confirmed, its two together
    first, *second = [rows[m.host.name]["times"] for m in machines if m.host.name in rows]
    if len(second) == 2:
        if min(int(t["started"]) for t in second) < int(first.get("confirmed", 1 << 62)):
            problems.append(f"the second wave started before the first was confirmed: "
                            f"{first} / {second}")
        if abs(int(second[0]["started"]) - int(second[1]["started"])) > 60:
            problems.append(f"the second wave's hosts did not start together: {second}")
    if problems:
        raise E2EError("fleet report", "; ".join(problems), None)


def run_fleet(workdir: Path, progress: Callable[[str], None] | None = None) -> FleetResult:
    """The whole scenario (module docstring); E2EError naming what failed. progress(text):
    told of each step as it starts and ends, and of each play and task."""
    say = progress or (lambda text: None)
    steps = Steps(say)
    steps.start("building the bundle")
    bundle = build_bundle(workdir)
    key = workdir / "id_fleet"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "resin-migrate-e2e",
                    "-f", str(key)], check=True)
    public_key = (workdir / "id_fleet.pub").read_text()
    steps.start("preparing the disks", ", ".join(host.name for host in HOSTS))
    machines = [prepare(host, workdir, public_key) for host in HOSTS]
    pki = workdir / "pki"
    ca = make_ca(pki, "fleet-ca")
    cert = make_server_cert(pki, ca, addresses=("127.0.0.1", HOST_FROM_GUEST))
    with BundleServer(bundle, tls=cert) as server:
        bundle_url = server.url.replace("127.0.0.1", HOST_FROM_GUEST)
        for machine in machines:
            _start(machine)
        steps.start("booting the three VMs", f"serial logs under {workdir}; until sshd "
                    "answers")
        try:
            _wait_for_ssh(machines, key)
            for machine in machines:
                if machine.host.old_tools:
                    said = machine.ssh(key, " ".join(
                        f"command -v {tool} || echo {tool}: absent;" for tool in OLD_TOOLS))
                    if said.stdout.split("\n")[:-1] != [f"{t}: absent" for t in OLD_TOOLS]:
                        raise E2EError("legacy boot", f"{machine.host.name} still has "
                                       f"{said.stdout.strip()}", None)
            inventory = _inventory(machines, workdir, key, bundle, bundle_url, ca[0])
            steps.start("the playbook", f"serial {SERIAL}; its log: {workdir / 'ansible.log'}")
            code, output, seconds = _play(inventory, workdir, say)
            say(f"ansible-playbook exited with {code}")
            steps.start("stopping the VMs")
        finally:
            _stop(machines, key)
    steps.start("checking the report and the disks")
    recap = output[output.rfind("PLAY RECAP"):].splitlines()[1:]
    report_path = workdir / "report.json"
    if not report_path.exists():
        raise E2EError("playbook", f"ansible-playbook exited with {code} and wrote no "
                       f"report:\n{output[-6000:]}", None)
    report = json.loads(report_path.read_text())
    # a refused device fails its host: ansible-playbook's 2, within the failure budget
    if code != 2:
        raise E2EError("playbook", f"ansible-playbook exited with {code}, expected 2 (one "
                       f"host failed):\n{output[-6000:]}", None)
    try:
        _check_report(report, machines)
        for machine in machines:
            if machine.error is not None:
                raise E2EError("VM", f"{machine.host.name}: {machine.error}", None)
            if machine.host.suitable:
                _check_migrated(machine)
            else:
                _check_untouched(machine)
    except E2EError as exc:
        raise E2EError(exc.phase, f"{exc.problem}\n--- ansible-playbook (tail) ---\n"
                       f"{output[-6000:]}", exc.result) from None
    steps.end()
    return FleetResult(report=report, machines=machines, play_seconds=seconds, recap=recap)
