"""The device's network configuration carried into resinOS as NetworkManager keyfiles.

Golden cases under tests/data/network/<case>/: `root/` holds the device's files, `live/`
the recorded output of `ip` (JSON, or the text of an old iproute2), `expected/` the
keyfiles, compared by parsing them (configparser), and `expected.json` the routes and
whether the device is refused.
"""

from __future__ import annotations

import configparser
import json
import os
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from runtime.netconfig import keyfile, netplan
from runtime.netconfig.carry import NetworkPlan, detect, read_live, sysroot_reader
from runtime.preflight import Preflight
from tests.test_stage1 import Device, device  # noqa: F401  (the loop-device fixture)

DATA = Path(__file__).resolve().parent / "data" / "network"
CASES = sorted(path.name for path in DATA.iterdir() if path.is_dir())
# what each command printed; `ip -j route` of iproute2 4.14-4.16 (Ubuntu 18.04) is text
LIVE_FILES = {("ip", "-j", "addr"): ("ip-j-addr.json", "ip-j-addr.txt"),
              ("ip", "-j", "route"): ("ip-j-route.json", "ip-j-route.txt"),
              ("ip", "-o", "addr"): ("ip-o-addr.txt",), ("ip", "route"): ("ip-route.txt",),
              ("ip", "-o", "link"): ("ip-o-link.txt",)}


def recorded_ip(live: Path, ran: list[tuple[str, ...]] | None = None):
    """run_ip for read_live: the recorded output, or None as a failing `ip` would give."""
    def run_ip(argv: list[str]) -> str | None:
        if ran is not None:
            ran.append(tuple(argv))
        for name in LIVE_FILES[tuple(argv)]:
            if (live / name).exists():
                return (live / name).read_text()
        return None
    return run_ip


def plan_of(case: str) -> NetworkPlan:
    root = DATA / case / "root"
    read = sysroot_reader(str(root))
    live = DATA / case / "live"
    state = read_live(recorded_ip(live), read, str(live / "sys-class-net")) \
        if live.is_dir() else None
    return detect(read, state)


def parse_keyfile(text: str) -> dict[str, dict[str, str]]:
    parser = configparser.RawConfigParser()
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return {section: dict(parser.items(section)) for section in parser.sections()}


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    plan = plan_of(case)
    expected = json.loads((DATA / case / "expected.json").read_text())
    produced = plan.texts()
    wanted = {path.name: path.read_text()
              for path in sorted((DATA / case / "expected").iterdir())} \
        if (DATA / case / "expected").is_dir() else {}
    assert sorted(produced) == sorted(wanted), plan.lines()
    for name, text in produced.items():
        assert keyfile.NAME_PATTERN.match(name)
        parsed = parse_keyfile(text)
        uuid.UUID(parsed["connection"].pop("uuid"))
        assert parsed == parse_keyfile(wanted[name]), name
    assert [[r.interface, r.gateway, r.carried] for r in plan.routes] == expected["routes"]
    assert bool(plan.refusal) is expected["refused"], plan.refusal
    if expected["refused"]:
        assert expected["refusal"] in plan.refusal
    shown = json.dumps(plan.to_dict()) + "\n".join(plan.lines()) + plan.summary()
    for secret in expected.get("secrets", []):
        assert secret not in shown


def test_keyfiles_are_stable() -> None:
    """The same device gives the same files (uuid included): a resumed stage 1 rewrites
    them identically."""
    assert plan_of("nm-wifi-wpa-psk").texts() == plan_of("nm-wifi-wpa-psk").texts()


def test_plan_names_every_source() -> None:
    lines = "\n".join(plan_of("ubuntu1804-netplan-static").lines())
    assert "resin-migrate-enp0s31f6: enp0s31f6 ethernet MAC 54:B2:03:11:22:33: static " \
        "10.20.30.40/24, gateway 10.20.30.1, DNS 10.20.30.2 10.20.30.3 (from " \
        "/etc/netplan/01-netcfg.yaml), from /etc/netplan/01-netcfg.yaml" in lines
    assert "fleet keyfiles on flash-boot" in lines
    lines = "\n".join(plan_of("ubuntu1404-ifupdown-static").lines())
    assert "from /etc/network/interfaces" in lines
    assert "from /etc/network/interfaces.d/eth1.cfg" in lines
    wifi = "\n".join(plan_of("nm-wifi-wpa-psk").lines())
    assert "not carried: wifi wifi (/etc/NetworkManager/system-connections/CorpWiFi." \
        "nmconnection): 802.1X" in wifi or "CorpWiFi.nmconnection): 802.1X" in wifi


def test_dns_from_systemd_resolved_when_resolv_conf_is_the_stub(tmp_path: Path) -> None:
    case = DATA / "dhcp-no-config"
    plan = plan_of("dhcp-no-config")
    assert plan.keyfiles[0][1].source.startswith("live state")
    del case
    # a static address no file names (systemd-networkd, say) is carried from the kernel
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/resolv.conf").write_text("nameserver 127.0.0.53\n")
    (root / "run/systemd/resolve").mkdir(parents=True)
    (root / "run/systemd/resolve/resolv.conf").write_text("nameserver 9.9.9.9\n")
    live = tmp_path / "live"
    live.mkdir()
    (live / "ip-j-addr.json").write_text(json.dumps([{
        "ifname": "eno1", "flags": ["UP"], "link_type": "ether", "address": "aa:bb:cc:00:11:22",
        "addr_info": [{"family": "inet", "local": "10.0.0.9", "prefixlen": 8}]}]))
    (live / "ip-j-route.json").write_text(json.dumps([
        {"dst": "default", "gateway": "10.0.0.1", "dev": "eno1", "protocol": "static"}]))
    read = sysroot_reader(str(root))
    plan = detect(read, read_live(recorded_ip(live), read, str(live)))
    [(name, connection)] = plan.keyfiles
    assert name == "resin-migrate-eno1"
    parsed = parse_keyfile(plan.texts()[name])
    assert parsed["ipv4"] == {"method": "manual", "address1": "10.0.0.9/8,10.0.0.1",
                              "dns": "9.9.9.9;"}
    assert connection.dns_source == "/run/systemd/resolve/resolv.conf"


def test_netplan_subset() -> None:
    text = """\
network:
  version: 2   # a comment
  ethernets:
    eth0:
      addresses:
        - "192.168.5.5/24"
        - 10.0.0.5/8
      routes:
        - to: 0.0.0.0/0
          via: 192.168.5.1
          metric: 100
        - {to: 172.16.0.0/12, via: 10.0.0.1}
      nameservers: {addresses: [1.1.1.1, '8.8.8.8'], search: []}
  wifis:
    wlan0:
      dhcp4: yes
      access-points:
        "my net # not a comment":
          password: "p@ss: word"
"""
    document = netplan.load(text, "t.yaml")
    eth0 = document["network"]["ethernets"]["eth0"]
    assert eth0["addresses"] == ["192.168.5.5/24", "10.0.0.5/8"]
    assert eth0["routes"][0] == {"to": "0.0.0.0/0", "via": "192.168.5.1", "metric": "100"}
    assert eth0["routes"][1] == {"to": "172.16.0.0/12", "via": "10.0.0.1"}
    assert eth0["nameservers"] == {"addresses": ["1.1.1.1", "8.8.8.8"], "search": []}
    points = document["network"]["wifis"]["wlan0"]["access-points"]
    assert points == {"my net # not a comment": {"password": "p@ss: word"}}
    [eth, wifi] = netplan.connections(document["network"], {})
    assert (eth.method, eth.addresses, eth.gateway) == (
        "manual", [("192.168.5.5", 24), ("10.0.0.5", 8)], "192.168.5.1")
    assert (wifi.ssid, wifi.psk, wifi.method) == ("my net # not a comment", "p@ss: word", "auto")
    with pytest.raises(netplan.NetplanError, match="t.yaml:2"):
        netplan.load("network:\n  ethernets: &anchor\n", "t.yaml")
    # a line the parser cannot read is named, never shown: it may hold a password
    for bad in ("      password: *Secret-42\n", "      password \"Secret-42\"\n"):
        with pytest.raises(netplan.NetplanError) as error:
            netplan.load("wifis:\n  wlan0:\n    access-points:\n      x:\n" + bad, "t.yaml")
        assert "Secret-42" not in str(error.value) and "t.yaml:5" in str(error.value)


def test_odd_ssid_and_key_escaped() -> None:
    from runtime.netconfig import Connection
    connection = Connection("wlan0", "wifi", "x", ssid=" café;", psk=" a\\b",
                            mac="aa:bb:cc:dd:ee:ff", security="wpa-psk")
    parsed = parse_keyfile(keyfile.render(connection, "resin-migrate-wlan0"))
    assert parsed["wifi"]["ssid"] == "32;99;97;102;195;169;59;"
    assert parsed["wifi-security"]["psk"] == "\\sa\\\\b"
    with pytest.raises(ValueError):
        keyfile.render(connection, "../etc/passwd")


def test_sources_name_what_they_cannot_carry() -> None:
    from runtime.netconfig import ifupdown, nmconnection
    agent = nmconnection.parse("[connection]\nid=a\ntype=wifi\n[wifi]\nssid=A\n"
                               "[wifi-security]\nkey-mgmt=wpa-psk\npsk-flags=1\n", "a")
    assert agent is not None and "not stored" in agent.unsupported
    vlan = nmconnection.parse("[connection]\nid=v\ntype=vlan\n[vlan]\nid=5\n", "v")
    assert vlan is not None and "a VLAN" in vlan.unsupported
    text = ("iface wlan0 inet static\n address 10.1.2.3\n netmask 255.255.0.0\n"
            " wpa-ssid \"Yard\"\n wpa-psk \"yard-key-1\"\n"
            "iface eth0.7 inet dhcp\n\nmapping hotplug\n script grep\n")
    stanzas, _, problems = ifupdown.read_stanzas(
        lambda path: text if path == ifupdown.INTERFACES else None)
    wifi, vlan_if = ifupdown.connections(stanzas)
    assert (wifi.ssid, wifi.psk, wifi.addresses) == ("Yard", "yard-key-1", [("10.1.2.3", 16)])
    assert "a VLAN" in vlan_if.unsupported
    assert problems and "mapping" in problems[0]


def test_a_malformed_mac_is_refused_by_name_not_written() -> None:
    """A MAC NetworkManager would not take (five bytes here) makes no keyfile; the plan
    refuses, naming the address and its source."""
    from runtime.netconfig import ifupdown
    text = ("auto eth0\niface eth0 inet static\n address 10.1.2.3\n netmask 255.255.255.0\n"
            " gateway 10.1.2.1\n hwaddress ether 00:11:22:33:44\n")
    plan = detect(lambda path: text if path == ifupdown.INTERFACES else None, None)
    said = "\n".join(plan.lines())
    assert plan.refusal, said
    assert "the MAC address 00:11:22:33:44 configured for eth0" in said
    assert "not six hex bytes" in said and ifupdown.INTERFACES in said
    assert not plan.texts()
    well_formed = text.replace("00:11:22:33:44", "00:11:22:33:44:5a")
    plan = detect(lambda path: well_formed if path == ifupdown.INTERFACES else None, None)
    assert not plan.refusal and "mac-address=00:11:22:33:44:5A" in "".join(plan.texts().values())
    # on DHCP ethernet resinOS's own default still reaches the device: no refusal
    dhcp = "auto eth0\niface eth0 inet dhcp\n hwaddress ether 00:11:22:33:44\n"
    plan = detect(lambda path: dhcp if path == ifupdown.INTERFACES else None, None)
    said = "\n".join(plan.lines())
    assert not plan.refusal and not plan.texts(), said
    assert "not six hex bytes" in said and "default DHCP on ethernet covers it" in said


def _preflight_root(tmp_path: Path, case: str) -> Path:
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", str(DATA / case / "root"), str(root)], check=True)
    return root


def test_check_refuses_untranslatable_route(tmp_path: Path) -> None:
    root = _preflight_root(tmp_path, "refuse-bond")
    preflight = Preflight(str(root), str(tmp_path))
    preflight.check_network()
    [check] = [c for c in preflight.checks if c.ok is not None]
    assert check.ok is False
    assert "bond0" in check.found and "a bond" in check.found
    assert "--network-ok" in check.hint and "--network DIR" in check.hint
    assert not preflight.passed

    preflight = Preflight(str(root), str(tmp_path), network_ok=True)
    preflight.check_network()
    assert preflight.passed
    assert any("WARNING" in c.found and "--network-ok" in c.found for c in preflight.checks)


def test_check_passes_plain_dhcp(tmp_path: Path) -> None:
    root = _preflight_root(tmp_path, "debian-ifupdown-dhcp")
    preflight = Preflight(str(root), str(tmp_path))
    preflight.check_network()
    assert preflight.passed
    # without live state (--sysroot) the interface's MAC is unknown: nothing is carried,
    # resinOS's own DHCP on ethernet applies, and the check passes
    assert preflight.checks[0].ok is not False


def test_fleet_keyfiles_turn_the_refusal_into_a_warning(tmp_path: Path) -> None:
    from runtime.netconfig.carry import device_plan
    root = _preflight_root(tmp_path, "refuse-netplan-bridge-vlan")
    plan = device_plan(str(root), fleet=["bridge-uplink"])
    assert plan.refusal
    assert "fleet keyfiles on flash-boot (bridge-uplink) override" in "\n".join(plan.lines())


def test_keyfile_directory_written_0600(tmp_path: Path) -> None:
    plan = plan_of("wpa-supplicant-ifupdown")
    directory = tmp_path / "system-connections"
    (directory).mkdir()
    (directory / "resin-migrate-stale").write_text("from an earlier run")
    written = keyfile.write_all(plan.texts(), str(directory))
    assert sorted(written) == sorted(os.listdir(directory))
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in written:
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600


# --- on loop devices: the keyfiles reach flash-data, the key reaches nothing else ----

LOOP_PSK = "loop-test-Secret-psk-9f3a"
BOND = """\
auto eth0
iface eth0 inet manual
    bond-master bond0

auto bond0
iface bond0 inet static
    address 172.16.4.10/24
    gateway 172.16.4.1
    bond-slaves eth0 eth1
"""
NETPLAN = """\
network:
  version: 2
  ethernets:
    uplink:
      match:
        macaddress: 52:54:00:9a:00:01
      set-name: eth0
      addresses: [192.168.77.10/24]
      gateway4: 192.168.77.1
      nameservers:
        addresses: [192.168.77.2]
"""
NM_WIFI = f"""\
[connection]
id=Office
type=wifi

[wifi]
ssid=Office WiFi
mac-address=52:54:00:9A:00:02

[wifi-security]
key-mgmt=wpa-psk
psk={LOOP_PSK}

[ipv4]
method=auto
"""


@pytest.mark.loop
def test_stage1_writes_keyfiles_to_flash_data(device: Device,  # noqa: F811
                                              tmp_path: Path) -> None:
    root = device.sysroot
    (root / "etc/network").mkdir(parents=True, exist_ok=True)
    interfaces = root / "etc/network/interfaces"
    interfaces_before = interfaces.read_text() if interfaces.exists() else None
    interfaces.write_text(BOND)
    refused = device.runtime("check")
    assert refused.returncode == 10, refused.stdout + refused.stderr
    assert "FAIL  network" in refused.stdout and "bond0" in refused.stdout
    assert "--network-ok" in refused.stdout
    assert not (root / "var/lib/resin-migrate").exists()
    overridden = device.runtime("check", "--network-ok")
    assert overridden.returncode == 0, overridden.stdout + overridden.stderr
    assert "WARNING" in overridden.stdout

    if interfaces_before is None:
        interfaces.unlink()
    else:
        interfaces.write_text(interfaces_before)
    (root / "etc/netplan").mkdir(parents=True, exist_ok=True)
    (root / "etc/netplan/01-static.yaml").write_text(NETPLAN)
    connections = root / "etc/NetworkManager/system-connections"
    connections.mkdir(parents=True, exist_ok=True)
    (connections / "Office.nmconnection").write_text(NM_WIFI)
    (connections / "Office.nmconnection").chmod(0o600)

    shown = []
    for args in (("check",), ("check", "--json"), ("plan",), ("plan", "--json")):
        result = device.runtime(*args)
        assert result.returncode == 0, result.stdout + result.stderr
        shown.append(result.stdout + result.stderr)
    assert "resin-migrate-eth0" in shown[2] and "192.168.77.10/24" in shown[2]
    assert "/etc/netplan/01-static.yaml" in shown[2]
    assert "fleet keyfiles on flash-boot" in shown[2]
    assert json.loads(shown[3])["network"]["keyfiles"][1]["ssid"] == "Office WiFi"
    result = device.runtime("stage1", "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    shown.append(result.stdout + result.stderr)

    data = next(Path(device.partition(n)) for n in range(2, 9)
                if subprocess.run(["blkid", "-s", "LABEL", "-o", "value",
                                   device.partition(n)], capture_output=True,
                                  text=True).stdout.strip() == "flash-data")
    mount = tmp_path / "data"
    mount.mkdir()
    subprocess.run(["mount", "-o", "ro", str(data), str(mount)], check=True)
    try:
        directory = mount / "system-connections"
        # the WiFi keyfile names no interface and --sysroot reads no live state: named by MAC
        assert sorted(os.listdir(directory)) == ["resin-migrate-eth0",
                                                 "resin-migrate-wifi-5254009a0002"]
        for path in directory.iterdir():
            info = path.stat()
            assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0, path
        eth0 = parse_keyfile((directory / "resin-migrate-eth0").read_text())
        assert eth0["ethernet"]["mac-address"] == "52:54:00:9A:00:01"
        assert eth0["ipv4"]["address1"] == "192.168.77.10/24,192.168.77.1"
        [wifi] = [p for p in directory.iterdir() if "eth0" not in p.name]
        assert parse_keyfile(wifi.read_text())["wifi-security"]["psk"] == LOOP_PSK
        stage1_log = (mount / "resin-migrate-stage1.log").read_text()
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    assert "resin-migrate-eth0: eth0 ethernet MAC 52:54:00:9A:00:01: static" in stage1_log
    state_dir = root / "var/lib/resin-migrate"
    for text in shown + [stage1_log, (root / "var/log/resin-migrate.log").read_text()] + [
            path.read_text(errors="replace") for path in state_dir.rglob("*") if path.is_file()]:
        assert LOOP_PSK not in text
    rolled = device.runtime("rollback")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr


def test_without_iproute2_the_macs_come_from_sysfs(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys-class-net"
    for name, mac, kind in (("ens3", "52:54:00:12:34:56", "1"), ("lo", "00:00:00:00:00:00",
                                                                  "772")):
        (sysfs / name).mkdir(parents=True)
        (sysfs / name / "address").write_text(mac + "\n")
        (sysfs / name / "type").write_text(kind + "\n")
    root = tmp_path / "root"
    (root / "etc" / "network").mkdir(parents=True)
    (root / "etc" / "network" / "interfaces").write_text(
        "auto ens3\niface ens3 inet static\n    address 192.168.5.10/24\n"
        "    gateway 192.168.5.1\n")
    read = sysroot_reader(str(root))
    state = read_live(lambda argv: None, read, str(sysfs))
    assert sorted(state.links) == ["ens3"]
    plan = detect(read, state)
    keyfiles = plan.texts()
    assert len(keyfiles) == 1
    parsed = configparser.ConfigParser()
    parsed.read_string(next(iter(keyfiles.values())))
    assert parsed["ethernet"]["mac-address"].upper() == "52:54:00:12:34:56"
    assert parsed["ipv4"]["address1"] == "192.168.5.10/24,192.168.5.1"


# iproute2 generations, each with what read_live must run and the default route it finds:
# 3.12 (Ubuntu 14.04) refuses -j ('Option "-j" is unknown', ip/ip.c at v3.12.0), 4.15
# (Ubuntu 18.04) prints JSON for `ip -j addr` but text for `ip -j route` (ip/iproute.c had
# no JSON until v4.17.0), 4.17 and later JSON for both
@pytest.mark.parametrize(("case", "ran", "route"), [
    ("ubuntu1404-ifupdown-static",
     [("ip", "-j", "addr"), ("ip", "-o", "addr"), ("ip", "-o", "link"), ("ip", "route")],
     ("eth0", "192.168.1.1")),
    ("ubuntu1804-netplan-static", [("ip", "-j", "addr"), ("ip", "-j", "route")],
     ("enp0s31f6", "10.20.30.1")),
    ("debian-ifupdown-dhcp", [("ip", "-j", "addr"), ("ip", "-j", "route")], None),
], ids=["iproute2-3.12", "iproute2-4.15", "iproute2-4.17"])
def test_ip_output_form_is_decided_per_command(case: str, ran: list[tuple[str, ...]],
                                               route: tuple[str, str] | None) -> None:
    live = DATA / case / "live"
    commands: list[tuple[str, ...]] = []
    state = read_live(recorded_ip(live, commands), sysroot_reader(str(DATA / case / "root")),
                      str(live / "sys-class-net"))
    assert commands == ran
    assert state.routes, "no route read"
    if route is not None:
        assert (state.routes[0].dev, state.routes[0].gateway) == route
    assert all(link.name for link in state.links.values())


def test_ip_j_route_text_of_iproute2_4_15() -> None:
    """The recorded `ip -j route` of 4.15 is print_route's text (each field "%s ", a newline
    after the last: ip/iproute.c at v4.15.0), which is not JSON: parsed as text."""
    from runtime.netconfig import live
    text = (DATA / "ubuntu1804-netplan-static/live/ip-j-route.txt").read_text()
    assert all(line.endswith(" ") for line in text.splitlines())
    assert not live.is_json(text)
    with pytest.raises(ValueError):
        live.parse_route_json(text)
    [default] = live.parse_route_text(text)
    assert (default.dev, default.gateway, default.protocol) == ("enp0s31f6", "10.20.30.1",
                                                                "static")
    assert live.is_json((DATA / "debian-ifupdown-dhcp/live/ip-j-route.json").read_text())
    assert live.is_json("[]") and not live.is_json("") and not live.is_json("[{") and \
        not live.is_json(None)


def test_ip_j_addr_printing_text_falls_back_to_the_text_commands() -> None:
    """An iproute2 that ignores -j for addresses too (exit 0, text) is read through `ip -o
    addr`, `ip -o link` and `ip route`; `ip -j route` is not asked."""
    live_dir = DATA / "ubuntu1404-ifupdown-static" / "live"
    recorded = recorded_ip(live_dir)
    commands: list[tuple[str, ...]] = []

    def run_ip(argv: list[str]) -> str | None:
        commands.append(tuple(argv))
        if argv == ["ip", "-j", "addr"]:
            return ("1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN \n"
                    "    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00\n"
                    "    inet 127.0.0.1/8 scope host lo\n")
        return recorded(argv)

    state = read_live(run_ip, sysroot_reader(str(DATA / "ubuntu1404-ifupdown-static/root")),
                      str(live_dir / "sys-class-net"))
    assert commands == [("ip", "-j", "addr"), ("ip", "-o", "addr"), ("ip", "-o", "link"),
                        ("ip", "route")]
    assert state.links["eth0"].addresses[0]["address"] == "192.168.1.50"
    assert state.links["eth0"].mac == "00:1E:67:0A:4B:21"
    assert [(r.dev, r.gateway) for r in state.routes] == [("eth0", "192.168.1.1")]
