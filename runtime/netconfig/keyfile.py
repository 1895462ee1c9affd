"""NetworkManager keyfiles, the format resinOS reads from resin-boot's system-connections/.

Each carried connection becomes one file, matched to its interface by MAC address
(interface names differ between the old kernel and resinOS). The text holds the WiFi
key: it is written to files of mode 0600 and never logged.
"""

import hashlib
import os
import re

from ..files import encode, fsync_directory, write_atomic
from . import WIFI

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Dict, List  # noqa: F401  # novermin

    from . import Connection  # noqa: F401

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PREFIX = "resin-migrate-"
SIMPLE_SSID = re.compile(r"^[\x21-\x3a\x3c-\x5b\x5d-\x7e]([\x20-\x3a\x3c-\x5b\x5d-\x7e]*"
                         r"[\x21-\x3a\x3c-\x5b\x5d-\x7e])?$")


def file_name(interface, index=0):
    # type: (str, int) -> str
    """resin-migrate-eth0 (resin-migrate-wlan0-2 for a second network of one interface)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", interface or "if") or "if"
    name = PREFIX + safe + ("-{}".format(index + 1) if index else "")
    return name[:128]


def stable_uuid(text):
    # type: (str) -> str
    """A name-based (version 5 style) UUID: the same device gives the same keyfiles."""
    digest = bytearray(hashlib.sha1(b"resin-migrate keyfile " + encode(text)).digest())
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    hexed = "".join("{:02x}".format(byte) for byte in digest[:16])
    return "-".join((hexed[:8], hexed[8:12], hexed[12:16], hexed[16:20], hexed[20:]))


def escape(value):
    # type: (str) -> str
    """A GKeyFile string value: backslash, newline, tab and a leading space escaped."""
    text = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t") \
        .replace("\r", "\\r")
    if text.startswith(" "):
        text = "\\s" + text[1:]
    return text


def ssid_value(ssid):
    # type: (str) -> str
    """The SSID as text when plain, else as NetworkManager's list of byte values."""
    if SIMPLE_SSID.match(ssid):
        return ssid
    return "".join("{};".format(byte) for byte in bytearray(encode(ssid)))


def render(connection, name):
    # type: (Connection, str) -> str
    """The keyfile text of a carried connection (it holds the WiFi key, if any)."""
    if not NAME_PATTERN.match(name):
        raise ValueError("keyfile name {!r} does not match {}".format(name,
                                                                      NAME_PATTERN.pattern))
    kind = "wifi" if connection.kind == WIFI else "ethernet"
    lines = ["[connection]", "id=" + name,
             "uuid=" + stable_uuid(name + "/" + connection.mac),
             "type=" + kind, "autoconnect=true", ""]
    if kind == "wifi":
        lines += ["[wifi]", "mode=infrastructure", "ssid=" + ssid_value(connection.ssid)]
        if connection.hidden:
            lines.append("hidden=true")
    else:
        lines.append("[ethernet]")
    if connection.mac:
        lines.append("mac-address=" + connection.mac)
    lines.append("")
    if kind == "wifi" and connection.security == "wpa-psk":
        lines += ["[wifi-security]", "key-mgmt=wpa-psk", "psk=" + escape(connection.psk), ""]
    lines += ["[ipv4]"]
    if connection.method == "manual":
        lines.append("method=manual")
        for number, (address, prefix) in enumerate(connection.addresses, 1):
            lines.append("address{}={}/{}{}".format(
                number, address, prefix,
                "," + connection.gateway if number == 1 and connection.gateway else ""))
    else:
        lines.append("method=" + ("disabled" if connection.method == "disabled" else "auto"))
    if connection.dns:
        lines.append("dns=" + "".join(server + ";" for server in connection.dns))
    if connection.search:
        lines.append("dns-search=" + "".join(escape(name_) + ";"
                                             for name_ in connection.search))
    lines += ["", "[ipv6]", "method=auto", ""]
    return "\n".join(lines)


def describe(connection):
    # type: (Connection) -> str
    """One line for the plan and the log: never the key."""
    what = "WiFi {!r} ({})".format(connection.ssid, "WPA-PSK" if connection.security ==
                                   "wpa-psk" else "open") if connection.kind == WIFI \
        else "ethernet"
    if connection.method == "manual":
        addressing = "static {}{}".format(
            ", ".join("{}/{}".format(a, p) for a, p in connection.addresses),
            ", gateway " + connection.gateway if connection.gateway else ", no gateway")
    elif connection.method == "disabled":
        addressing = "no IPv4"
    else:
        addressing = "DHCP"
    dns = ", DNS {} (from {})".format(" ".join(connection.dns), connection.dns_source) \
        if connection.dns else ""
    return "{} {} MAC {}: {}{}, from {}".format(connection.interface or "(any)", what,
                                               connection.mac or "?", addressing, dns,
                                               connection.source)


def names(files):
    # type: (List[str]) -> List[str]
    return [name for name in files if NAME_PATTERN.match(name)]


def write_all(texts, directory):
    # type: (Dict[str, str], str) -> List[str]
    """Write name -> text as files of mode 0600 in directory (made 0700), each synced and
    read back; files of an earlier run that are no longer wanted are removed."""
    if not os.path.isdir(directory):
        os.mkdir(directory, 0o700)
    os.chmod(directory, 0o700)
    for name in os.listdir(directory):
        if name.startswith(PREFIX) and name not in texts:
            os.unlink(os.path.join(directory, name))
    for name, text in sorted(texts.items()):
        if not NAME_PATTERN.match(name):
            raise ValueError("keyfile name {!r} does not match {}".format(
                name, NAME_PATTERN.pattern))
        path = os.path.join(directory, name)
        data = encode(text)
        write_atomic(path, data, mode=0o600)
        with open(path, "rb") as check:
            if check.read() != data:
                raise IOError("{} reads back different from what was written".format(path))
    fsync_directory(directory)      # the removals, when nothing was written
    return sorted(texts)
