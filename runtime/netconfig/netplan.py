"""netplan: the YAML subset its files use for ethernet and WiFi, static and DHCP.

The runtime has no YAML library, so `load` parses the subset netplan files are written
in: block mappings and sequences by indentation, flow sequences and mappings on one line
(`[a, b]`, `{to: default, via: 10.0.0.1}`), quoted and plain scalars, comments. Anything
else (anchors, multi-line scalars, tags) raises NetplanError naming the file and line.
"""

import re

from . import ETHERNET, WIFI, Connection, NetworkError, is_ipv4, is_ipv6, split_address

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Any, Dict, List, Tuple  # noqa: F401  # novermin

DIRECTORIES = ("/lib/netplan", "/etc/netplan", "/run/netplan")  # later wins, per file name
UNSUPPORTED_SECTIONS = {"bonds": "a bond", "bridges": "a bridge", "vlans": "a VLAN",
                        "tunnels": "a tunnel", "modems": "a modem", "vrfs": "a VRF",
                        "wireguard": "WireGuard"}
TRUE = ("true", "yes", "on", "y")


class NetplanError(NetworkError):
    """A netplan file uses YAML this parser does not read."""


def _strip_comment(line):
    # type: (str) -> str
    quote = ""
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1] in " \t"):
            return line[:index].rstrip()
    return line.rstrip()


def _scalar(text, where):
    # type: (str, str) -> Any
    text = text.strip()
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        return re.sub(r'\\(.)', lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)),
                      text[1:-1])
    if text.startswith("'") and text.endswith("'") and len(text) >= 2:
        return text[1:-1].replace("''", "'")
    if text.startswith(("[", "{")):
        return _flow(text, where)
    if text.startswith(("&", "*", "!", "|", ">")):
        # the value is not shown: it may be a WiFi password
        raise NetplanError("{}: a YAML feature this parser does not read (a value starting "
                           "with {!r}: anchor, alias, tag or multi-line scalar)".format(
                               where, text[0]))
    return text


def _split_flow(body, where):
    # type: (str, str) -> List[str]
    items, depth, quote, start = [], 0, "", 0
    for index, char in enumerate(body):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(body[start:index])
            start = index + 1
    if quote or depth:
        raise NetplanError("{}: unbalanced flow collection".format(where))
    items.append(body[start:])
    return [item.strip() for item in items if item.strip()]


def _flow(text, where):
    # type: (str, str) -> Any
    if text.startswith("[") and text.endswith("]"):
        return [_scalar(item, where) for item in _split_flow(text[1:-1], where)]
    if text.startswith("{") and text.endswith("}"):
        mapping = {}  # type: Dict[str, Any]
        for item in _split_flow(text[1:-1], where):
            key, value = _key_value(item, where)
            mapping[key] = _scalar(value, where) if value else None
        return mapping
    raise NetplanError("{}: a flow collection must close on the same line".format(where))


def _key_value(text, where):
    # type: (str, str) -> Tuple[str, str]
    match = re.match(r'''^("[^"]*"|'[^']*'|[^'"][^:]*?|[^'"]?)\s*:(\s+(.*)|)$''', text)
    if not match:
        raise NetplanError("{}: expected 'key: value' (the line is not shown: it may hold a "
                           "WiFi password)".format(where))
    return _scalar(match.group(1), where), (match.group(3) or "").strip()


def load(text, source):
    # type: (str, str) -> Any
    """The document of a netplan file, as dicts, lists and strings."""
    lines = []  # type: List[Tuple[int, str, str]]
    for number, raw in enumerate(text.splitlines(), 1):
        if "\t" in raw[:len(raw) - len(raw.lstrip())]:
            raise NetplanError("{}:{}: a tab in the indentation".format(source, number))
        line = _strip_comment(raw)
        if not line.strip() or line.strip() in ("---", "..."):
            continue
        if line.lstrip().startswith("%"):
            continue
        lines.append((len(line) - len(line.lstrip()), line.strip(),
                      "{}:{}".format(source, number)))
    if not lines:
        return {}
    value, index = _block(lines, 0, lines[0][0])
    if index != len(lines):
        raise NetplanError("{}: unexpected indentation".format(lines[index][2]))
    return value


def _block(lines, index, indent):
    # type: (List[Tuple[int, str, str]], int, int) -> Tuple[Any, int]
    if lines[index][1].startswith("- ") or lines[index][1] == "-":
        return _sequence(lines, index, indent)
    return _mapping(lines, index, indent)


def _nested(lines, index, indent, value, where):
    # type: (List[Tuple[int, str, str]], int, int, str, str) -> Tuple[Any, int]
    """The value after 'key:' - inline, an indented block, or a sequence at the same indent."""
    if value:
        return _scalar(value, where), index
    if index < len(lines) and (lines[index][0] > indent or (
            lines[index][0] == indent and lines[index][1].startswith("-"))):
        return _block(lines, index, lines[index][0])
    return None, index


def _mapping(lines, index, indent):
    # type: (List[Tuple[int, str, str]], int, int) -> Tuple[Any, int]
    mapping = {}  # type: Dict[str, Any]
    while index < len(lines) and lines[index][0] == indent and \
            not lines[index][1].startswith("-"):
        _, text, where = lines[index]
        key, value = _key_value(text, where)
        mapping[str(key)], index = _nested(lines, index + 1, indent, value, where)
    if index < len(lines) and lines[index][0] > indent:
        raise NetplanError("{}: unexpected indentation".format(lines[index][2]))
    return mapping, index


def _sequence(lines, index, indent):
    # type: (List[Tuple[int, str, str]], int, int) -> Tuple[Any, int]
    items = []  # type: List[Any]
    while index < len(lines) and lines[index][0] == indent and (
            lines[index][1].startswith("- ") or lines[index][1] == "-"):
        _, text, where = lines[index]
        rest = text[1:].strip()
        if not rest:
            item, index = _nested(lines, index + 1, indent, "", where)
        elif re.match(r'''^("[^"]*"|'[^']*'|[^'"\[{][^:]*?)\s*:(\s|$)''', rest):
            # "- key: value" opens a mapping whose further keys align with "key"
            inner = indent + (len(text) - len(rest))
            rewritten = [(inner, rest, where)] + lines[index + 1:]
            item, used = _mapping(rewritten, 0, inner)
            index = index + used
        else:
            item, index = _scalar(rest, where), index + 1
        items.append(item)
    return items, index


def merge(documents):
    # type: (List[Any]) -> Dict[str, Any]
    """netplan's rule: later files add to and override the mappings of earlier ones."""
    def combine(old, new):
        if isinstance(old, dict) and isinstance(new, dict):
            result = dict(old)
            for key, value in new.items():
                result[key] = combine(old.get(key), value)
            return result
        return new
    merged = {}  # type: Dict[str, Any]
    for document in documents:
        if isinstance(document, dict):
            merged = combine(merged, document)
    return merged


def _dict(value):
    # type: (Any) -> Dict[str, Any]
    return value if isinstance(value, dict) else {}


def _true(value):
    # type: (Any) -> bool
    return str(value).lower() in TRUE


def _strings(value):
    # type: (Any) -> List[str]
    if value is None:
        return []
    if isinstance(value, list):
        return [str(item) for item in value]
    return [str(value)]


def connections(network, sources):
    # type: (Dict[str, Any], Dict[str, str]) -> List[Connection]
    """Connections of the merged `network:` mapping. sources maps each interface id to the
    file that last defined it."""
    found = []  # type: List[Connection]
    if not isinstance(network, dict):
        return found
    members = set()  # type: set
    for section, what in sorted(UNSUPPORTED_SECTIONS.items()):
        for name, settings in sorted((network.get(section) or {}).items()):
            settings = _dict(settings)
            members.update(_strings(settings.get("interfaces")))
            if settings.get("link"):
                members.add(str(settings["link"]))
            connection = Connection(name, section.rstrip("s"), sources.get(name, "netplan"),
                                    unsupported="{} ({}: {})".format(what, section, name))
            _addressing(connection, settings)
            found.append(connection)
    for section, kind in (("ethernets", ETHERNET), ("wifis", WIFI)):
        for name, settings in sorted((network.get(section) or {}).items()):
            settings = _dict(settings)
            source = sources.get(name, "netplan")
            match = _dict(settings.get("match"))
            interface = str(settings.get("set-name") or match.get("name") or name)
            base = Connection(interface, kind, source)
            base.mac = str(match.get("macaddress", "")).upper()
            base.mac_source = source if base.mac else ""
            _addressing(base, settings)
            if name in members or interface in members:
                base.unsupported = "a member of a bond, bridge or VLAN"
            if "*" in interface or "?" in interface:
                base.notes.append("matches interfaces by the pattern {!r}".format(interface))
            if kind == ETHERNET:
                if settings.get("auth"):
                    base.unsupported = base.unsupported or "802.1X authentication"
                found.append(base)
                continue
            points = settings.get("access-points") or {}
            if not points:
                base.unsupported = base.unsupported or "a WiFi interface without access-points"
                found.append(base)
            for ssid, point in sorted(points.items()):
                point = _dict(point)
                network_ = Connection(interface, WIFI, source, ssid=str(ssid))
                for attribute in ("method", "addresses", "gateway", "dns", "dns_source",
                                  "search", "mac", "mac_source", "ipv6", "unsupported"):
                    setattr(network_, attribute, getattr(base, attribute))
                auth = _dict(point.get("auth"))
                password = point.get("password") or auth.get("password")
                key_management = str(auth.get("key-management", "psk" if password else "none"))
                if key_management in ("eap", "802.1x"):
                    network_.unsupported = network_.unsupported or "802.1X authentication"
                elif password:
                    network_.psk, network_.security = str(password), "wpa-psk"
                mode = str(point.get("mode", "infrastructure"))
                if mode != "infrastructure":
                    network_.unsupported = network_.unsupported or "WiFi mode " + mode
                network_.hidden = _true(point.get("hidden", "false"))
                found.append(network_)
    return found


def _addressing(connection, settings):
    # type: (Connection, Dict[str, Any]) -> None
    v4 = []  # type: List[Tuple[str, int]]
    v6 = False
    for address in _strings(settings.get("addresses")):
        if is_ipv6(address):
            v6 = True
        else:
            try:
                v4.append(split_address(address))
            except ValueError:
                connection.unsupported = connection.unsupported or \
                    "an address this tool does not read: {!r}".format(address)
    connection.addresses = v4
    if _true(settings.get("dhcp4", "false")):
        connection.method = "auto"
    elif v4:
        connection.method = "manual"
    else:
        connection.method = "disabled"
    gateway = str(settings.get("gateway4") or "")
    for route in settings.get("routes") or []:
        if isinstance(route, dict) and str(route.get("to")) in ("default", "0.0.0.0/0") and \
                is_ipv4(str(route.get("via", ""))):
            gateway = gateway or str(route["via"])
    connection.gateway = gateway
    servers = _dict(settings.get("nameservers"))
    connection.dns = [a for a in _strings(servers.get("addresses")) if is_ipv4(a)]
    connection.dns_source = connection.source if connection.dns else ""
    connection.search = _strings(servers.get("search"))
    if v6 and connection.method != "disabled":
        connection.notes.append("its static IPv6 addresses are not carried (resinOS "
                                "configures IPv6 automatically)")
    if v6 and connection.method == "disabled" and not _true(settings.get("dhcp6", "false")):
        connection.ipv6 = "static"
        connection.unsupported = connection.unsupported or "IPv6-only static addressing"
