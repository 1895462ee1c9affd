"""NetworkManager connection files (/etc/NetworkManager/system-connections), keyfile format.

Both spellings are read: the setting names NetworkManager 0.9/1.0 wrote on Ubuntu 14.04
(`[802-3-ethernet]`, `[802-11-wireless]`, `addresses1=a;24;gw;`) and the aliases of later
releases (`[ethernet]`, `[wifi]`, `address1=a/24,gw`).
"""

import configparser
import re

from ..files import decode
from . import ETHERNET, WIFI, Connection, is_ipv4, split_address

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import List, Optional  # noqa: F401  # novermin

ALIASES = {"802-3-ethernet": "ethernet", "802-11-wireless": "wifi",
           "802-11-wireless-security": "wifi-security"}
UNSUPPORTED_TYPES = {"bond": "a bond", "vlan": "a VLAN", "bridge": "a bridge",
                     "team": "a team", "pppoe": "PPPoE", "gsm": "a mobile broadband modem",
                     "cdma": "a mobile broadband modem", "vpn": "a VPN",
                     "infiniband": "InfiniBand", "wireguard": "WireGuard"}


def _unescape(value):
    # type: (str) -> str
    """GKeyFile escapes: \\s \\n \\t \\r \\\\."""
    out = []
    index = 0
    while index < len(value):
        char = value[index]
        if char == "\\" and index + 1 < len(value):
            nxt = value[index + 1]
            out.append({"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}.get(nxt, nxt))
            index += 2
            continue
        out.append(char)
        index += 1
    return "".join(out)


def _ssid(value):
    # type: (str) -> str
    """ssid=text, or the list of byte values (`ssid=77;121;` as 0.9 wrote it)."""
    if re.match(r"^(\d{1,3};)+\d{0,3}$", value):
        data = bytearray(int(byte) for byte in value.split(";") if byte)
        return decode(bytes(data))     # bytes that are not UTF-8 kept (files.py)
    return _unescape(value)


def _list(value):
    # type: (str) -> List[str]
    return [item.strip() for item in value.split(";") if item.strip()]


def _read(text, source):
    # type: (str, str) -> Optional[configparser.RawConfigParser]
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source)
    except configparser.Error:
        return None
    for old, new in ALIASES.items():
        if parser.has_section(old):
            if not parser.has_section(new):
                parser.add_section(new)
            for key, value in parser.items(old):
                parser.set(new, key, value)
    return parser


def _get(parser, section, key, default=""):
    # type: (configparser.RawConfigParser, str, str, str) -> str
    if parser.has_section(section) and parser.has_option(section, key):
        return parser.get(section, key).strip()
    return default


def _ipv4(parser, connection):
    # type: (configparser.RawConfigParser, Connection) -> None
    method = _get(parser, "ipv4", "method", "auto")
    connection.method = {"auto": "auto", "manual": "manual", "disabled": "disabled",
                         "link-local": "disabled"}.get(method, method)
    if method == "shared":
        connection.unsupported = "IPv4 method 'shared' (this device routes for others)"
    keys = sorted(key for key in (parser.options("ipv4") if parser.has_section("ipv4") else [])
                  if re.match(r"^(address|addresses)\d*$", key))
    for key in keys:
        value = _get(parser, "ipv4", key)
        if "/" in value:
            # address1=192.168.1.10/24,192.168.1.1 (one or more, ';'-separated)
            for item in _list(value):
                address, _, gateway = item.partition(",")
                connection.addresses.append(split_address(address))
                if gateway.strip() and not connection.gateway:
                    connection.gateway = gateway.strip()
            continue
        # addresses1=192.168.1.10;24;192.168.1.1; (NetworkManager 0.9)
        parts = _list(value)
        if parts and is_ipv4(parts[0]):
            connection.addresses.append(split_address(parts[0], parts[1] if len(parts) > 1
                                                      else ""))
            if len(parts) > 2 and parts[2] != "0.0.0.0" and not connection.gateway:
                connection.gateway = parts[2]
    gateway = _get(parser, "ipv4", "gateway")
    if gateway:
        connection.gateway = gateway
    connection.dns = [item for item in _list(_get(parser, "ipv4", "dns")) if is_ipv4(item)]
    connection.dns_source = connection.source if connection.dns else ""
    connection.search = _list(_get(parser, "ipv4", "dns-search"))
    if _get(parser, "ipv6", "method") == "manual":
        connection.ipv6 = "static"


def parse(text, source):
    # type: (str, str) -> Optional[Connection]
    """The connection one keyfile describes, or None when it is not a keyfile."""
    parser = _read(text, source)
    if parser is None or not parser.has_section("connection"):
        return None
    kind = _get(parser, "connection", "type")
    kind = ALIASES.get(kind, kind)
    interface = _get(parser, "connection", "interface-name")
    if _get(parser, "connection", "autoconnect", "true").lower() == "false":
        connection = Connection(interface, kind, source,
                                unsupported="not started automatically (autoconnect=false)")
        return connection
    connection = Connection(interface, kind if kind in (ETHERNET, WIFI) else kind, source)
    if _get(parser, "connection", "master") or _get(parser, "connection", "slave-type"):
        connection.unsupported = "a port of {} {}".format(
            _get(parser, "connection", "slave-type", "a bond or bridge"),
            _get(parser, "connection", "master"))
        return connection
    if kind not in (ETHERNET, WIFI):
        connection.unsupported = "{} ({})".format(UNSUPPORTED_TYPES.get(kind, kind),
                                                  "type=" + kind)
        return connection
    connection.mac = _get(parser, kind, "mac-address").upper()
    connection.mac_source = source if connection.mac else ""
    _ipv4(parser, connection)
    if parser.has_section("802-1x"):
        connection.unsupported = "802.1X authentication"
    if kind == WIFI:
        connection.ssid = _ssid(_get(parser, WIFI, "ssid"))
        connection.hidden = _get(parser, WIFI, "hidden").lower() == "true"
        mode = _get(parser, WIFI, "mode", "infrastructure")
        if mode != "infrastructure":
            connection.unsupported = "WiFi mode {}".format(mode)
        key_mgmt = _get(parser, "wifi-security", "key-mgmt")
        if key_mgmt in ("wpa-psk", "sae"):
            connection.security = "wpa-psk"
            connection.psk = _unescape(_get(parser, "wifi-security", "psk"))
            if not connection.psk and not connection.unsupported:
                connection.unsupported = ("the WiFi key of {!r} is not stored in the file "
                                          "(psk-flags: kept by a desktop agent)".format(
                                              connection.ssid))
        elif key_mgmt in ("wpa-eap", "ieee8021x"):
            connection.unsupported = "802.1X authentication (key-mgmt={})".format(key_mgmt)
        elif key_mgmt == "none" and (_get(parser, "wifi-security", "wep-key0") or
                                     _get(parser, "wifi-security", "wep-key-type")):
            connection.unsupported = "WEP"
        elif key_mgmt:
            connection.unsupported = "WiFi security key-mgmt={}".format(key_mgmt)
    if connection.ipv6_only and not connection.unsupported:
        connection.unsupported = "IPv6-only static addressing"
    return connection
