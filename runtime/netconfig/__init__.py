"""The device's network configuration, read from its files and its live state.

One module per source format (nmconnection, ifupdown, netplan, wpa), `live` for what
the kernel reports, `keyfile` for the NetworkManager keyfiles resinOS reads, and `carry`
which combines them into the plan of what is carried across. Every parser takes file
text and the path the device knows the file by, so tests feed them recorded files.
"""

import re

from ..errors import MigrateError

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import List, Optional, Tuple  # noqa: F401  # novermin

# Kinds a keyfile can carry; every other kind is named in `unsupported`.
ETHERNET = "ethernet"
WIFI = "wifi"
MAC_PATTERN = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
IPV4_PATTERN = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$")


class NetworkError(MigrateError):
    """The network configuration cannot be carried as found."""

    exit_code = 10


class Connection(object):
    """One way an interface is configured, as one source describes it.

    method is "auto" (DHCP), "manual" (static) or "disabled" for IPv4. `unsupported`
    names why no keyfile can express it (a bond, a VLAN, 802.1X...), or is empty.
    `psk` is a secret: it goes into the keyfile and nowhere else (not to_dict, not logs).
    """

    def __init__(self, interface, kind, source, method="auto", addresses=None, gateway="",
                 dns=None, search=None, mac="", ssid="", psk="", security="none",
                 hidden=False, ipv6="", unsupported=""):
        # type: (str, str, str, str, Optional[List[Tuple[str, int]]], str, Optional[List[str]], Optional[List[str]], str, str, str, str, bool, str, str) -> None  # noqa: E501
        self.interface = interface
        self.kind = kind
        self.source = source
        self.method = method
        self.addresses = list(addresses or [])
        self.gateway = gateway
        self.dns = list(dns or [])
        self.search = list(search or [])
        self.mac = mac.upper()
        self.ssid = ssid
        self.psk = psk
        self.security = security     # "none" (open) or "wpa-psk"
        self.hidden = hidden
        self.ipv6 = ipv6             # "static" when the source sets an IPv6 address
        self.unsupported = unsupported
        self.dns_source = source if dns else ""
        self.mac_source = source if mac else ""
        self.notes = []  # type: List[str]
        # not carried, but resinOS's own default (DHCP on any ethernet) does the same
        self.default_covers = False

    @property
    def carried(self):
        # type: () -> bool
        return not self.unsupported

    @property
    def ipv6_only(self):
        # type: () -> bool
        return self.ipv6 == "static" and self.method == "disabled"

    def to_dict(self):
        """Everything but the secret: what --json and the plan may show."""
        return {"interface": self.interface, "kind": self.kind, "source": self.source,
                "method": {"auto": "dhcp", "manual": "static"}.get(self.method, self.method),
                "addresses": ["{}/{}".format(a, p) for a, p in self.addresses],
                "gateway": self.gateway, "dns": self.dns, "dns_source": self.dns_source,
                "search": self.search, "mac": self.mac, "mac_source": self.mac_source,
                "ssid": self.ssid, "security": self.security,
                "key": "(stored, not shown)" if self.psk else "",
                "hidden": self.hidden, "unsupported": self.unsupported, "notes": self.notes}

    def __repr__(self):
        return "Connection({!r})".format(self.to_dict())


def prefix_of_netmask(netmask):
    # type: (str) -> int
    """255.255.255.0 -> 24; a netmask that is not contiguous raises ValueError."""
    match = IPV4_PATTERN.match(netmask.strip())
    if not match:
        raise ValueError("not a netmask: {!r}".format(netmask))
    value = 0
    for part in match.groups():
        value = (value << 8) | int(part)
    bits = bin(value)[2:].zfill(32)
    if "01" in bits:
        raise ValueError("not a contiguous netmask: {!r}".format(netmask))
    return bits.count("1")


def split_address(text, netmask=""):
    # type: (str, str) -> Tuple[str, int]
    """'192.168.1.10/24' or ('192.168.1.10', '255.255.255.0') -> ('192.168.1.10', 24)."""
    address, _, prefix = text.strip().partition("/")
    if not is_ipv4(address):
        raise ValueError("not an IPv4 address: {!r}".format(text))
    if prefix:
        if not prefix.isdigit() or int(prefix) > 32:
            raise ValueError("bad prefix length in {!r}".format(text))
        return address, int(prefix)
    if netmask:
        if netmask.isdigit():
            return address, int(netmask)
        return address, prefix_of_netmask(netmask)
    first = int(address.split(".")[0])  # no mask given: the classful one, as ifupdown does
    return address, 8 if first < 128 else 16 if first < 192 else 24


def is_ipv4(text):
    # type: (str) -> bool
    match = IPV4_PATTERN.match(text.strip())
    return match is not None and all(int(part) < 256 for part in match.groups())


def is_ipv6(text):
    # type: (str) -> bool
    return ":" in text and bool(re.match(r"^[0-9A-Fa-f:.]+(/\d+)?$", text.strip()))
