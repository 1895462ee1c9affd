"""wpa_supplicant.conf: the network={...} blocks, as WiFi connections."""

import re

from ..files import decode
from . import WIFI, Connection

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Dict, List  # noqa: F401  # novermin

HEX_PSK = re.compile(r"^[0-9A-Fa-f]{64}$")


def _blocks(text):
    # type: (str) -> List[Dict[str, str]]
    blocks = []  # type: List[Dict[str, str]]
    current = None  # type: Dict[str, str] | None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if current is None:
            if re.match(r"^network\s*=\s*\{$", line):
                current = {}
            continue
        if line == "}":
            blocks.append(current)
            current = None
            continue
        key, eq, value = line.partition("=")
        if eq:
            current[key.strip()] = value.strip()
    return blocks


def _unquote(value):
    # type: (str) -> str
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _ssid(value):
    # type: (str) -> str
    """ssid="text", or the hex form wpa_supplicant writes for other bytes."""
    if value.startswith('"'):
        return _unquote(value)
    try:
        return decode(bytes(bytearray.fromhex(value)))     # other bytes kept (files.py)
    except ValueError:
        return value


def parse(text, source, interface=""):
    # type: (str, str, str) -> List[Connection]
    """The networks of a wpa_supplicant.conf, in the order written (disabled ones left out)."""
    found = []
    for block in _blocks(text):
        if block.get("disabled") == "1" or "ssid" not in block:
            continue
        ssid = _ssid(block["ssid"])
        key_mgmt = block.get("key_mgmt", "WPA-PSK" if "psk" in block else "NONE").upper()
        connection = Connection(interface, WIFI, source, ssid=ssid,
                                hidden=block.get("scan_ssid") == "1")
        psk = block.get("psk", "")
        if "WPA-EAP" in key_mgmt or "IEEE8021X" in key_mgmt or "eap" in block:
            connection.unsupported = "WiFi {!r} uses 802.1X (EAP)".format(ssid)
        elif "WPA-PSK" in key_mgmt or "SAE" in key_mgmt:
            if psk.startswith('"'):
                connection.psk = _unquote(psk)
            elif HEX_PSK.match(psk):
                connection.psk = psk.lower()
            else:
                connection.unsupported = "WiFi {!r}: no usable psk".format(ssid)
            connection.security = "wpa-psk"
        elif any(name.startswith("wep_key") for name in block):
            connection.unsupported = "WiFi {!r} uses WEP".format(ssid)
        found.append(connection)
    return found
