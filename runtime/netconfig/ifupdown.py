"""ifupdown: /etc/network/interfaces, with `source` and `source-directory` followed.

Only the stanzas an interface is configured by are read (`iface NAME inet|inet6 METHOD`
and their options); `mapping` stanzas are named as unsupported.
"""

import fnmatch
import os
import re

from . import ETHERNET, WIFI, Connection, is_ipv4, split_address

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Callable, Dict, List, Optional, Tuple  # noqa: F401  # novermin

INTERFACES = "/etc/network/interfaces"
SOURCE_DIR_NAME = re.compile(r"^[a-zA-Z0-9_-]+$")  # run-parts' rule for source-directory
BOND_OPTIONS = ("bond-slaves", "bond-master", "bond-mode", "bond_slaves", "slaves")
BRIDGE_OPTIONS = ("bridge_ports", "bridge-ports")
VLAN_OPTIONS = ("vlan-raw-device", "vlan_raw_device")


class Stanza(object):
    def __init__(self, interface, family, method, source):
        # type: (str, str, str, str) -> None
        self.interface = interface
        self.family = family
        self.method = method
        self.source = source
        self.options = []  # type: List[Tuple[str, str]]

    def get(self, *names):
        # type: (str) -> str
        for key, value in self.options:
            if key in names:
                return value
        return ""


def _logical_lines(text):
    # type: (str) -> List[str]
    lines = []  # type: List[str]
    pending = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") and not pending:
            continue
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    if pending:
        lines.append(pending)
    return lines


def read_stanzas(sysroot_reader, path="/etc/network/interfaces", seen=None):
    # type: (Callable[[str], Optional[str]], str, Optional[set]) -> Tuple[List[Stanza], List[str], List[str]]  # noqa: E501
    """The iface stanzas of path and what it sources, the files read, and the unsupported.

    sysroot_reader(device_path) returns a file's text, or None when it does not exist;
    `listdir:`-prefixed paths return the names in a directory joined by newlines.
    """
    seen = seen if seen is not None else set()
    stanzas = []  # type: List[Stanza]
    files = []  # type: List[str]
    problems = []  # type: List[str]
    if path in seen:
        return stanzas, files, problems
    seen.add(path)
    text = sysroot_reader(path)
    if text is None:
        return stanzas, files, problems
    files.append(path)
    current = None  # type: Optional[Stanza]
    for line in _logical_lines(text):
        words = line.split()
        if not words:
            continue
        keyword = words[0]
        if keyword == "iface" and len(words) >= 4:
            current = Stanza(words[1], words[2], words[3], path)
            stanzas.append(current)
        elif keyword in ("source", "source-directory") and len(words) >= 2:
            current = None
            pattern = words[1] if words[1].startswith("/") else os.path.join(
                os.path.dirname(INTERFACES), words[1])
            if keyword == "source-directory":
                names = [name for name in _listdir(sysroot_reader, pattern)
                         if SOURCE_DIR_NAME.match(name)]
                targets = [os.path.join(pattern, name) for name in sorted(names)]
            else:
                directory = os.path.dirname(pattern)
                targets = [os.path.join(directory, name)
                           for name in sorted(_listdir(sysroot_reader, directory))
                           if fnmatch.fnmatch(name, os.path.basename(pattern))]
            for target in targets:
                more, more_files, more_problems = read_stanzas(sysroot_reader, target, seen)
                stanzas += more
                files += more_files
                problems += more_problems
        elif keyword == "mapping":
            current = None
            problems.append("{}: a 'mapping' stanza ({}), resolved by a script at boot".format(
                path, " ".join(words[1:])))
        elif keyword in ("auto", "allow-hotplug", "no-auto-down", "no-scripts") or \
                keyword.startswith("allow-"):
            current = None
        elif current is not None:
            current.options.append((keyword, " ".join(words[1:])))
    return stanzas, files, problems


def _listdir(reader, directory):
    # type: (Callable[[str], Optional[str]], str) -> List[str]
    listing = reader("listdir:" + directory)
    return [name for name in (listing or "").split("\n") if name]


def connections(stanzas, wpa_reader=None):
    # type: (List[Stanza], Optional[Callable[[str, str], List[Connection]]]) -> List[Connection]
    """One connection per interface that has an inet or inet6 stanza (loopback left out).

    wpa_reader(path, interface) parses a `wpa-conf` file into WiFi connections.
    """
    by_name = {}  # type: Dict[str, Dict[str, Stanza]]
    order = []  # type: List[str]
    for each in stanzas:
        if each.method == "loopback" or each.interface == "lo":
            continue
        if each.interface not in by_name:
            by_name[each.interface] = {}
            order.append(each.interface)
        by_name[each.interface].setdefault(each.family, each)
    found = []  # type: List[Connection]
    for name in order:
        families = by_name[name]
        inet = families.get("inet")
        inet6 = families.get("inet6")
        stanza = inet if inet is not None else inet6  # type: Optional[Stanza]
        if stanza is None:
            continue
        options = dict((key, value) for s in (inet6, inet) if s for key, value in s.options)
        wireless = any(key.startswith(("wpa-", "wireless-")) for key in options)
        connection = Connection(name, WIFI if wireless else ETHERNET, stanza.source)
        connection.mac = options.get("hwaddress", "").replace("ether", "").strip().upper()
        connection.mac_source = stanza.source if connection.mac else ""
        if inet6 is not None and inet6.method == "static":
            connection.ipv6 = "static"
        found.extend(_describe(connection, inet, options, wpa_reader))
    return found


def _describe(connection, inet, options, wpa_reader):
    # type: (Connection, Optional[Stanza], Dict[str, str], Optional[Callable[[str, str], List[Connection]]]) -> List[Connection]  # noqa: E501
    name = connection.interface
    ports = options.get("bond-slaves") or options.get("bond_slaves") or options.get("slaves")
    if options.get("bond-master"):
        connection.unsupported = "a port of the bond {}".format(options["bond-master"])
    elif any(key in options for key in BOND_OPTIONS) or name.startswith("bond"):
        connection.kind = "bond"
        connection.unsupported = "a bond{}".format(
            " (ports: {})".format(ports) if ports and ports != "none" else "")
    elif any(key in options for key in BRIDGE_OPTIONS) or name.startswith(("br", "vmbr")):
        connection.kind = "bridge"
        connection.unsupported = "a bridge (ports: {})".format(
            options.get("bridge_ports") or options.get("bridge-ports") or "?")
    elif any(key in options for key in VLAN_OPTIONS) or re.match(r"^.+\.\d+$", name) or \
            name.startswith("vlan"):
        connection.kind = "vlan"
        connection.unsupported = "a VLAN ({})".format(name)
    elif "wpa-eap" in options or options.get("wpa-key-mgmt", "").upper().startswith("WPA-EAP") \
            or "wpa-identity" in options:
        connection.unsupported = "802.1X authentication"
    if inet is None:
        connection.method = "disabled"
    elif inet.method == "dhcp":
        connection.method = "auto"
    elif inet.method == "static":
        connection.method = "manual"
        address = options.get("address", "")
        try:
            connection.addresses.append(split_address(address, options.get("netmask", "")))
        except ValueError:
            connection.unsupported = connection.unsupported or \
                "a static address ifupdown reads but this tool does not: {!r}".format(address)
        connection.gateway = inet.get("gateway")
    elif inet.method == "manual":
        # brought up by something else (a bond port, a bridge port, a hook)
        connection.method = "disabled"
        connection.unsupported = connection.unsupported or \
            "'inet manual' (configured by another program or a hook)"
    else:
        connection.unsupported = connection.unsupported or \
            "'inet {}' (only static and dhcp are carried)".format(inet.method)
    connection.dns = [item for item in options.get("dns-nameservers", "").split()
                      if is_ipv4(item)]
    connection.dns_source = connection.source if connection.dns else ""
    connection.search = options.get("dns-search", "").split()
    if connection.ipv6_only and not connection.unsupported:
        connection.unsupported = "IPv6-only static addressing"
    elif connection.ipv6 == "static":
        connection.notes.append("its static IPv6 address is not carried (resinOS configures "
                                "IPv6 automatically)")
    if connection.kind != WIFI:
        return [connection]
    return _wifi(connection, options, wpa_reader)


def _wifi(connection, options, wpa_reader):
    # type: (Connection, Dict[str, str], Optional[Callable[[str, str], List[Connection]]]) -> List[Connection]  # noqa: E501
    conf = options.get("wpa-conf") or options.get("wpa-roam")
    networks = []  # type: List[Connection]
    if conf and wpa_reader is not None:
        networks = wpa_reader(conf, connection.interface)
    elif "wpa-ssid" in options:
        ssid = options["wpa-ssid"].strip('"')
        network = Connection(connection.interface, WIFI, connection.source, ssid=ssid)
        psk = options.get("wpa-psk", "").strip('"')
        if psk:
            network.psk, network.security = psk, "wpa-psk"
        network.hidden = options.get("wpa-ap-scan") == "2" or "wpa-scan-ssid" in options
        networks = [network]
    elif "wireless-essid" in options:
        network = Connection(connection.interface, WIFI, connection.source,
                             ssid=options["wireless-essid"].strip('"'))
        if options.get("wireless-key"):
            network.unsupported = "WEP"
        networks = [network]
    if not networks:
        connection.unsupported = connection.unsupported or \
            "a WiFi interface without a network (no wpa-ssid or readable wpa-conf)"
        return [connection]
    for network in networks:
        # the stanza's addressing applies to every network of its wpa-conf
        for attribute in ("method", "addresses", "gateway", "dns", "dns_source", "search",
                          "mac", "mac_source", "ipv6"):
            setattr(network, attribute, getattr(connection, attribute))
        network.unsupported = network.unsupported or connection.unsupported
        if network.source != connection.source:
            network.notes.append("addressing from {}".format(connection.source))
    return networks
