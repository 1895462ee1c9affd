"""The live state: interfaces, addresses and routes as the kernel has them, and DNS.

`ip -j addr` and `ip -j route` where iproute2 has JSON output; the text of `ip -o addr`,
`ip -o link` and `ip route` where it has not, decided per command from what `ip` printed:
iproute2 before 4.14 (Ubuntu 14.04's 3.12, 16.04's 4.3) refuses `-j` ("Option "-j" is
unknown", ip/ip.c), and 4.14 to 4.16 (Ubuntu 18.04's 4.15) print JSON for `ip -j addr` but
the usual text for `ip -j route` (ip/iproute.c had no JSON output until 4.17). The parsers
take the commands' output, so tests feed recorded output.
"""

import json
import re

from . import is_ipv4

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Callable, Dict, List, Optional  # noqa: F401  # novermin

STUB_RESOLVER = "127.0.0.53"
RESOLV_CONF = "/etc/resolv.conf"
RESOLVED_CONF = "/run/systemd/resolve/resolv.conf"


class Link(object):
    def __init__(self, name, mac="", kind="", up=False):
        # type: (str, str, str, bool) -> None
        self.name = name
        self.mac = mac.upper()
        self.kind = kind            # "ether", "loopback", ...
        self.up = up
        self.addresses = []         # type: List[Dict[str, object]]
        self.wireless = name.startswith("wl")


class Route(object):
    def __init__(self, dev, gateway, protocol="", metric=0):
        # type: (str, str, str, int) -> None
        self.dev = dev
        self.gateway = gateway
        self.protocol = protocol
        self.metric = metric


class LiveState(object):
    """What the running kernel reports; `dns` from resolv.conf, `dns_source` its path."""

    def __init__(self, links, routes, dns, dns_source, search=None):
        # type: (Dict[str, Link], List[Route], List[str], str, Optional[List[str]]) -> None
        self.links = links
        self.routes = routes
        self.dns = dns
        self.dns_source = dns_source
        self.search = search or []

    def default_routes(self):
        # type: () -> List[Route]
        return sorted(self.routes, key=lambda route: route.metric)


def parse_addr_json(text):
    # type: (str) -> Dict[str, Link]
    links = {}  # type: Dict[str, Link]
    for entry in json.loads(text or "[]"):
        if not isinstance(entry, dict) or not entry.get("ifname"):
            continue
        link = Link(str(entry["ifname"]), str(entry.get("address", "")),
                    str(entry.get("link_type", "")),
                    "UP" in (entry.get("flags") or []))
        for info in entry.get("addr_info") or []:
            if info.get("family") == "inet":
                link.addresses.append({"address": info.get("local"),
                                       "prefix": int(info.get("prefixlen", 32)),
                                       "dynamic": bool(info.get("dynamic"))})
        links[link.name] = link
    return links


def parse_route_json(text):
    # type: (str) -> List[Route]
    routes = []
    for entry in json.loads(text or "[]"):
        if isinstance(entry, dict) and entry.get("dst") in ("default", "0.0.0.0/0") and \
                entry.get("dev"):
            routes.append(Route(str(entry["dev"]), str(entry.get("gateway", "")),
                                str(entry.get("protocol", "")), int(entry.get("metric", 0))))
    return routes


def parse_link_text(text):
    # type: (str) -> Dict[str, Link]
    """`ip -o link`: "2: eth0: <BROADCAST,UP> mtu 1500 ... link/ether 52:54:00:..."."""
    links = {}  # type: Dict[str, Link]
    for line in text.splitlines():
        match = re.match(r"^\d+:\s+([^:@\s]+)(@\S+)?:\s+<([^>]*)>.*?link/(\S+)(\s+(\S+))?", line)
        if match:
            mac = match.group(6) or ""
            links[match.group(1)] = Link(match.group(1), mac if match.group(4) == "ether"
                                         else "", match.group(4),
                                         "UP" in match.group(3).split(","))
    return links


def parse_addr_text(text, links):
    # type: (str, Dict[str, Link]) -> Dict[str, Link]
    """`ip -o addr`: "2: eth0    inet 192.168.1.10/24 brd ... scope global dynamic eth0"."""
    for line in text.splitlines():
        match = re.match(r"^\d+:\s+(\S+)\s+inet\s+([\d.]+)/(\d+)(.*)$", line)
        if match:
            link = links.setdefault(match.group(1), Link(match.group(1)))
            link.addresses.append({"address": match.group(2), "prefix": int(match.group(3)),
                                   "dynamic": " dynamic" in match.group(4)})
    return links


def parse_route_text(text):
    # type: (str) -> List[Route]
    """`ip route`: "default via 192.168.1.1 dev eth0 proto dhcp metric 100"."""
    routes = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] not in ("default", "0.0.0.0/0"):
            continue
        fields = dict(zip(words[1::2], words[2::2]))
        if "dev" in fields:
            metric = fields.get("metric", "0")
            routes.append(Route(fields["dev"], fields.get("via", ""), fields.get("proto", ""),
                                int(metric) if metric.isdigit() else 0))
    return routes


def parse_resolv_conf(text):
    # type: (str) -> Dict[str, List[str]]
    servers, search = [], []  # type: List[str], List[str]
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver" and is_ipv4(words[1]):
            servers.append(words[1])
        elif words and words[0] in ("search", "domain"):
            search = words[1:]
    return {"servers": servers, "search": search}


def dns_of(read):
    # type: (Callable[[str], Optional[str]]) -> Dict[str, object]
    """The DNS servers the device uses: resolv.conf, or systemd-resolved's upstream list
    when resolv.conf names only its local stub (127.0.0.53)."""
    text = read(RESOLV_CONF) or ""
    found = parse_resolv_conf(text)
    source = RESOLV_CONF
    if not found["servers"] or found["servers"] == [STUB_RESOLVER]:
        upstream = parse_resolv_conf(read(RESOLVED_CONF) or "")
        if upstream["servers"]:
            found, source = upstream, RESOLVED_CONF
    servers = [server for server in found["servers"] if not server.startswith("127.")]
    return {"servers": servers, "search": found["search"],
            "source": source if servers else ""}


def is_json(text):
    # type: (Optional[str]) -> bool
    """Whether `ip -j ...` printed JSON (a list), rather than the text of an iproute2 that
    ignores -j for this object, or nothing."""
    if not text or not text.lstrip().startswith("["):
        return False
    try:
        return isinstance(json.loads(text), list)
    except ValueError:
        return False


def from_outputs(addr, route, dns, link="", json_output=True, route_json=None):
    # type: (str, str, Dict[str, object], str, bool, Optional[bool]) -> LiveState
    """A LiveState from the text `ip` printed: addr as JSON when json_output (else `ip -o
    addr` text, with `ip -o link`'s), route as JSON when route_json (default: json_output)."""
    links = parse_addr_json(addr) if json_output else \
        parse_addr_text(addr, parse_link_text(link))
    if json_output if route_json is None else route_json:
        routes = parse_route_json(route)
    else:
        routes = parse_route_text(route)
    return LiveState(links, routes, list(dns["servers"]),  # type: ignore[call-overload]
                     str(dns["source"]), list(dns["search"]))  # type: ignore[call-overload]
