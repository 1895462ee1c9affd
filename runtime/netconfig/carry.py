"""What is carried into resinOS: every source read, cross-checked with the live state.

`detect` reads the device's files (under sysroot) and, given one, the live state; the
NetworkPlan it returns says which keyfiles are written, where each value came from, and
whether the device's working route can be carried at all (`refusal`).
"""

import os
import re

from ..files import decode, read_text
from . import (
    ETHERNET,
    MAC_PATTERN,
    WIFI,
    Connection,
    NetworkError,
    keyfile,
    live,
    nmconnection,
    wpa,
)
from . import ifupdown as ifupdown_module
from . import netplan as netplan_module

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Callable, Dict, List, Optional, Tuple  # noqa: F401  # novermin

NM_DIR = "/etc/NetworkManager/system-connections"
WPA_DIR = "/etc/wpa_supplicant"
FILE_LIMIT = 1 << 20
KEYFILE_DIR = "system-connections"
VIRTUAL = re.compile(r"^(bond|br|vmbr|team|vlan|tun|tap|wg|ppp|docker|virbr|veth)|\.\d+$")


def sysroot_reader(sysroot):
    # type: (str) -> Callable[[str], Optional[str]]
    """read(path) -> the text of path under sysroot, or None; `listdir:DIR` lists DIR."""
    def read(path):
        # type: (str) -> Optional[str]
        listing = path.startswith("listdir:")
        full = os.path.join(sysroot, path[len("listdir:"):].lstrip("/") if listing
                            else path.lstrip("/"))
        try:
            if listing:
                return "\n".join(sorted(os.listdir(full))) if os.path.isdir(full) else None
            if not os.path.isfile(full):
                return None
            with open(full, "rb") as handle:
                return decode(handle.read(FILE_LIMIT))
        except (IOError, OSError):
            return None
    return read


class Route(object):
    """A way off the device: its interface, and whether a keyfile carries it."""

    def __init__(self, interface, gateway, connection, source):
        # type: (str, str, Optional[Connection], str) -> None
        self.interface = interface
        self.gateway = gateway
        self.connection = connection
        self.source = source

    @property
    def carried(self):
        # type: () -> bool
        return self.connection is not None and (self.connection.carried or
                                                self.connection.default_covers)

    def via(self):
        # type: () -> str
        if self.gateway:
            return self.gateway
        if self.connection is not None and self.connection.method == "auto":
            return "DHCP"
        return "no IPv4 gateway"

    def reason(self):
        # type: () -> str
        if self.connection is None:
            return "no configuration found for it"
        return "{} ({})".format(self.connection.unsupported, self.connection.source)


class NetworkPlan(object):
    def __init__(self):
        self.connections = []  # type: List[Connection]
        self.keyfiles = []  # type: List[Tuple[str, Connection]]
        self.routes = []  # type: List[Route]
        self.files = []  # type: List[str]
        self.problems = []  # type: List[str]
        self.warnings = []  # type: List[str]
        self.live_note = ""
        self.fleet = None  # type: Optional[List[str]]

    @property
    def refusal(self):
        # type: () -> str
        """Why the device would be unreachable in resinOS, or '' when it would not be."""
        if not self.routes or any(route.carried for route in self.routes):
            return ""
        return "the only working route{} cannot be carried: {}".format(
            "s" if len(self.routes) > 1 else "",
            "; ".join("{} via {}: {}".format(route.interface or "?", route.via(),
                                             route.reason()) for route in self.routes))

    def texts(self):
        # type: () -> Dict[str, str]
        """name -> keyfile text. Holds secrets: written to 0600 files, never shown."""
        return dict((name, keyfile.render(connection, name))
                    for name, connection in self.keyfiles)

    def summary(self):
        # type: () -> str
        skipped = ["{} ({})".format(c.interface or c.ssid or "?", c.unsupported)
                   for c in self.connections if not c.carried]
        return "{}{}".format(
            "{} keyfile(s): {}".format(len(self.keyfiles), "; ".join(
                "{} = {}".format(name, keyfile.describe(c)) for name, c in self.keyfiles))
            if self.keyfiles else
            "nothing to carry: resinOS will use DHCP on ethernet (its default)",
            "; not carried: " + "; ".join(skipped) if skipped else "")

    def lines(self):
        # type: () -> List[str]
        """The plan's network lines: no secret in them."""
        out = ["keyfiles written to flash-data {}/ (mode 0600), copied by stage 2 into "
               "resin-boot {}/:".format(KEYFILE_DIR, KEYFILE_DIR)]
        for name, connection in self.keyfiles:
            out.append("  {}: {}".format(name, keyfile.describe(connection)))
            for note in connection.notes:
                out.append("      {}".format(note))
        if not self.keyfiles:
            out.append("  none: resinOS will use DHCP on ethernet (its default)")
        for connection in self.connections:
            if not connection.carried:
                out.append("  not carried: {} {} ({}): {}".format(
                    connection.interface or "?", connection.kind,
                    connection.source, connection.unsupported))
        for route in self.routes:
            out.append("  route: default via {} dev {} ({}){}".format(
                route.via(), route.interface or "(by MAC)", route.source,
                "" if route.carried else ": NOT carried"))
        if self.live_note:
            out.append("  " + self.live_note)
        if self.fleet:
            out.append("  fleet keyfiles on flash-boot ({}) override detected files of the "
                       "same name".format(", ".join(self.fleet)))
        else:
            out.append("  fleet keyfiles on flash-boot (builder --network), if any, override "
                       "detected files of the same name")
        out += ["  warning: " + warning for warning in self.warnings]
        out += ["  problem: " + problem for problem in self.problems]
        return out

    def to_dict(self):
        return {"keyfiles": [dict(connection.to_dict(), name=name)
                             for name, connection in self.keyfiles],
                "not_carried": [c.to_dict() for c in self.connections if not c.carried],
                "routes": [{"interface": r.interface, "gateway": r.gateway, "source": r.source,
                            "carried": r.carried} for r in self.routes],
                "files_read": self.files, "live": self.live_note or "read",
                "fleet_keyfiles": self.fleet, "warnings": self.warnings,
                "problems": self.problems, "refusal": self.refusal}


def read_sources(read, live_state=None):
    # type: (Callable[[str], Optional[str]], Optional[live.LiveState]) -> NetworkPlan
    """Every connection the device's files describe, in the order of precedence:
    ifupdown (NetworkManager leaves its interfaces alone), netplan, NetworkManager,
    then wpa_supplicant files nothing else referred to."""
    plan = NetworkPlan()
    used_wpa = set()  # type: set

    def wpa_reader(path, interface):
        # type: (str, str) -> List[Connection]
        used_wpa.add(path)
        text = read(path)
        if text is None:
            plan.problems.append("{} (named by wpa-conf) does not exist".format(path))
            return []
        plan.files.append(path)
        return wpa.parse(text, path, interface)

    stanzas, files, problems = ifupdown_module.read_stanzas(read)
    plan.files += files
    plan.problems += problems
    plan.connections += ifupdown_module.connections(stanzas, wpa_reader)

    documents, sources = [], {}  # type: List[object], Dict[str, str]
    by_name = {}  # type: Dict[str, str]
    for directory in netplan_module.DIRECTORIES:
        for name in (read("listdir:" + directory) or "").split("\n"):
            if name.endswith(".yaml"):
                by_name[name] = directory + "/" + name
    for name in sorted(by_name):
        path = by_name[name]
        text = read(path)
        if text is None:
            continue
        plan.files.append(path)
        try:
            document = netplan_module.load(text, path)
        except NetworkError as exc:
            plan.problems.append(str(exc))
            continue
        network = document.get("network") if isinstance(document, dict) else None
        if isinstance(network, dict):
            for section in ("ethernets", "wifis") + tuple(netplan_module.UNSUPPORTED_SECTIONS):
                for ident in (network.get(section) or {}):
                    sources[ident] = path
        documents.append(document)
    merged = netplan_module.merge(documents)
    plan.connections += netplan_module.connections(merged.get("network") or {}, sources)

    for name in (read("listdir:" + NM_DIR) or "").split("\n"):
        if not name or name.startswith(".") or name.endswith("~"):
            continue
        path = NM_DIR + "/" + name
        text = read(path)
        if text is None:
            continue
        connection = nmconnection.parse(text, path)
        if connection is None:
            plan.problems.append("{}: not a NetworkManager keyfile".format(path))
            continue
        plan.files.append(path)
        plan.connections.append(connection)

    for name in (read("listdir:" + WPA_DIR) or "").split("\n"):
        match = re.match(r"^wpa_supplicant(-(.+))?\.conf$", name)
        path = WPA_DIR + "/" + name
        if not match or path in used_wpa:
            continue
        text = read(path)
        if text is None:
            continue
        plan.files.append(path)
        interface = match.group(2) or _only_wireless(live_state)
        for connection in wpa.parse(text, path, interface or ""):
            if not interface:
                connection.notes.append("no interface named: for the WiFi interface")
            plan.connections.append(connection)
    return plan


def _only_wireless(live_state):
    # type: (Optional[live.LiveState]) -> str
    if live_state is None:
        return ""
    wireless = [name for name, link in sorted(live_state.links.items()) if link.wireless]
    return wireless[0] if len(wireless) == 1 else ""


def detect(read, live_state=None, live_note="", fleet=None):
    # type: (Callable[[str], Optional[str]], Optional[live.LiveState], str, Optional[List[str]]) -> NetworkPlan  # noqa: E501
    """The network plan: sources read, matched to interfaces and MACs, cross-checked."""
    plan = read_sources(read, live_state)
    plan.live_note = live_note
    plan.fleet = fleet
    links = live_state.links if live_state is not None else {}
    for connection in plan.connections:
        _match_link(connection, links, live_state is not None)
    _deduplicate(plan, links)
    if live_state is not None:
        _cross_check(plan, live_state)
    if not plan.routes:
        # no live state, or no IPv4 default route in it (an IPv6-only device): the routes
        # the configuration sets up
        for connection in plan.connections:
            if connection.gateway or connection.method == "auto" or connection.ipv6_only:
                plan.routes.append(Route(connection.interface, connection.gateway, connection,
                                         connection.source))
    _name_keyfiles(plan)
    return plan


def _match_link(connection, links, have_live):
    # type: (Connection, Dict[str, live.Link], bool) -> None
    """Fill in the MAC from the live link of the same name, or the name from the MAC."""
    if connection.kind not in (ETHERNET, WIFI) or connection.unsupported:
        return
    if not connection.interface and connection.mac:
        for name, link in links.items():
            if link.mac == connection.mac:
                connection.interface = name
    if not connection.interface and connection.kind == WIFI:
        wireless = [name for name, link in links.items() if link.wireless]
        if len(wireless) == 1:
            connection.interface = wireless[0]
    if not connection.interface and connection.kind == ETHERNET:
        wired = [name for name, link in links.items()
                 if link.kind == "ether" and not link.wireless and not VIRTUAL.search(name)]
        if len(wired) == 1:
            connection.interface = wired[0]
    found = links.get(connection.interface)
    if found is not None and found.mac:
        if connection.mac and connection.mac != found.mac:
            connection.notes.append("configured for MAC {} but {} has {} now".format(
                connection.mac, connection.interface, found.mac))
        elif not connection.mac:
            connection.mac = found.mac
            connection.mac_source = "live state (ip link, /sys/class/net)"
    if connection.mac and not MAC_PATTERN.fullmatch(connection.mac):
        # NetworkManager would refuse the keyfile, and the device would come up without it
        connection.unsupported = (
            "the MAC address {} configured for {} is not six hex bytes "
            "(aa:bb:cc:dd:ee:ff)".format(connection.mac, connection.interface or "the interface"))
    elif not connection.mac:
        connection.unsupported = (
            "the MAC address of {} is unknown (not in the configuration{})".format(
                connection.interface or "the interface",
                ", and no such interface is up" if have_live else
                "; the live state is not read with --sysroot"))
    if connection.unsupported and connection.kind == ETHERNET and connection.method == "auto":
        connection.default_covers = True
        connection.unsupported += "; resinOS's default DHCP on ethernet covers it"


def _deduplicate(plan, links):
    # type: (NetworkPlan, Dict[str, live.Link]) -> None
    """One connection per ethernet interface, one per WiFi network: the first source wins,
    unless a later one has the address the interface has now."""
    kept = []  # type: List[Connection]
    for connection in plan.connections:
        if not connection.carried:
            kept.append(connection)
            continue
        key = (connection.mac, connection.ssid if connection.kind == WIFI else "")
        earlier = [c for c in kept if c.carried and (c.mac, c.ssid if c.kind == WIFI else "")
                   == key]
        if not earlier:
            kept.append(connection)
            continue
        first = earlier[0]
        live_addresses = set(a["address"] for a in links[connection.interface].addresses) \
            if connection.interface in links else set()
        if not any(a in live_addresses for a, _ in first.addresses) and \
                any(a in live_addresses for a, _ in connection.addresses):
            kept[kept.index(first)] = connection
            connection.notes.append("chosen over {}: it has the live address".format(
                first.source))
        else:
            first.notes.append("{} also configures it; this one is used".format(
                connection.source))
    plan.connections = kept


def _cross_check(plan, state):
    # type: (NetworkPlan, live.LiveState) -> None
    for connection in plan.connections:
        link = state.links.get(connection.interface)
        if not connection.carried:
            continue
        if connection.method == "manual" and link is not None and link.addresses:
            live_addresses = ["{}/{}".format(a["address"], a["prefix"]) for a in link.addresses]
            configured = ["{}/{}".format(a, p) for a, p in connection.addresses]
            if not set(configured) & set(live_addresses):
                connection.notes.append("configured {} but {} has {} now; the configured "
                                        "address is carried".format(
                                            ", ".join(configured), connection.interface,
                                            ", ".join(live_addresses)))
        if connection.method == "manual" and not connection.dns and state.dns:
            connection.dns = list(state.dns)
            connection.dns_source = state.dns_source
            if not connection.search:
                connection.search = list(state.search)
    for route in state.default_routes():
        link = state.links.get(route.dev)
        candidates = [c for c in plan.connections if c.interface == route.dev or (
            link is not None and link.mac and c.mac == link.mac)]
        carried = [c for c in candidates if c.carried]
        if carried:
            chosen = carried[0]
            if chosen.method == "manual" and not chosen.gateway:
                chosen.gateway = route.gateway
                chosen.notes.append("gateway {} from the live route".format(route.gateway))
            plan.routes.append(Route(route.dev, route.gateway, chosen, chosen.source))
            continue
        if candidates:
            plan.routes.append(Route(route.dev, route.gateway, candidates[0],
                                     candidates[0].source))
            continue
        plan.routes.append(_from_live(plan, state, route, link))


def _from_live(plan, state, route, link):
    # type: (NetworkPlan, live.LiveState, live.Route, Optional[live.Link]) -> Route
    """A route through an interface no file configures (systemd-networkd, a hook, by hand):
    carried from what the kernel has, when it is plain ethernet."""
    source = "live state (no configuration file names {})".format(route.dev)
    connection = Connection(route.dev, ETHERNET, source)
    if link is None or not link.mac:
        connection.unsupported = "{} has no MAC address (not an ethernet interface)".format(
            route.dev)
    elif VIRTUAL.search(route.dev) or link.kind != "ether":
        connection.kind = link.kind or "virtual"
        connection.unsupported = "{} is a virtual interface ({})".format(
            route.dev, "a bond, bridge, VLAN or tunnel")
    elif link.wireless:
        connection.kind = WIFI
        connection.unsupported = "WiFi with no readable configuration (no SSID and key found)"
    else:
        connection.mac, connection.mac_source = link.mac, "live state (ip link)"
        addresses = link.addresses
        if not addresses or any(a["dynamic"] for a in addresses) or route.protocol == "dhcp":
            connection.method = "auto"
        else:
            connection.method = "manual"
            connection.addresses = [(str(a["address"]), int(str(a["prefix"])))
                                    for a in addresses]
            connection.gateway = route.gateway
            connection.dns, connection.dns_source = list(state.dns), state.dns_source
            connection.search = list(state.search)
    plan.connections.append(connection)
    return Route(route.dev, route.gateway, connection, source)


def _name_keyfiles(plan):
    # type: (NetworkPlan) -> None
    counts = {}  # type: Dict[str, int]
    for connection in plan.connections:
        if not connection.carried:
            continue
        label = connection.interface or "{}-{}".format(
            connection.kind, connection.mac.replace(":", "").lower())
        index = counts.get(label, 0)
        counts[label] = index + 1
        name = keyfile.file_name(label, index)
        plan.keyfiles.append((name, connection))
        if plan.fleet and name in plan.fleet:
            connection.notes.append("replaced by the fleet's keyfile {} on flash-boot".format(
                name))


def read_live(run_ip, read, sys_class_net="/sys/class/net"):
    # type: (Callable[[List[str]], Optional[str]], Callable[[str], Optional[str]], str) -> live.LiveState  # noqa: E501
    """The live state through run_ip(argv) -> stdout or None (a failed command)."""
    dns = live.dns_of(read)
    # JSON or text is decided per command: iproute2 before 4.14 refuses -j (or may print
    # text), 4.14-4.16 print JSON for addresses but text for `ip -j route`
    addr = run_ip(["ip", "-j", "addr"])
    addr_json = live.is_json(addr)
    links = ""
    if not addr_json:
        addr = run_ip(["ip", "-o", "addr"])
        links = run_ip(["ip", "-o", "link"]) or ""
    route = run_ip(["ip", "-j", "route"]) if addr_json else None
    route_json = live.is_json(route)
    if route is None or (not route_json and not route.strip()):
        route = run_ip(["ip", "route"])     # -j failed: the text form
        route_json = False
    state = live.from_outputs(addr or "", route or "", dns, link=links, json_output=addr_json,
                              route_json=route_json)
    _links_from_sysfs(state, sys_class_net)
    for name, link in state.links.items():
        if os.path.isdir(os.path.join(sys_class_net, name, "wireless")):
            link.wireless = True
    return state


def _links_from_sysfs(state, sys_class_net):
    # type: (live.LiveState, str) -> None
    """MAC addresses the kernel lists in sysfs, for links `ip` did not report (a device
    without iproute2): a static interface is still matched by its MAC in resinOS."""
    try:
        names = sorted(os.listdir(sys_class_net))
    except OSError:
        return
    for name in names:
        try:
            mac = read_text(os.path.join(sys_class_net, name, "address")).strip()
            # type 1: ARPHRD_ETHER (WiFi too)
            ether = read_text(os.path.join(sys_class_net, name, "type")).strip() == "1"
        except (IOError, OSError):
            continue
        if not ether or not re.match(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$", mac):
            continue
        link = state.links.get(name)
        if link is None:
            state.links[name] = live.Link(name, mac, "ether")
        elif not link.mac:
            link.mac = mac.upper()


def fleet_keyfiles(manifest):
    # type: (object) -> Optional[List[str]]
    """The names of the fleet's keyfiles on flash-boot (the builder's --network)."""
    names = getattr(manifest, "network_files", None)
    return [str(name) for name in names] if isinstance(names, list) else None


def device_plan(sysroot, fleet=None):
    # type: (str, Optional[List[str]]) -> NetworkPlan
    """The plan for the device whose root is sysroot; its live state only when that is the
    running system (/)."""
    from ..errors import MigrateError
    from ..run import run
    read = sysroot_reader(sysroot)
    if os.path.realpath(sysroot) != "/":
        return detect(read, None, "live state not read: --sysroot {} is not the running "
                      "system; the configuration files alone decide".format(sysroot), fleet)

    def run_ip(argv):
        # type: (List[str]) -> Optional[str]
        try:
            result = run(argv, check=False)
        except MigrateError:
            return None
        return result.stdout if result.returncode == 0 else None

    state = read_live(run_ip, read)
    note = "" if state.links else "live state: 'ip' reported no interfaces"
    return detect(read, state, note, fleet)
