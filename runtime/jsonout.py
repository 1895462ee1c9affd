"""The --json documents of check, plan, stage1 and status (docs/json.md).

Each is one JSON object on stdout (the log stays on stderr), with the same three fields
first: "json_version", "command" and "resin_migrate" (the runtime's version). A fleet tool
reads them across releases of this runtime, so within a JSON_VERSION a field is never
removed or renamed and never changes its meaning or type; fields may be added. Anything
else is a new JSON_VERSION, and docs/json.md says what changed.
"""

import json
import sys

from . import __version__

JSON_VERSION = 1


def document(command, fields):
    # type: (str, dict) -> dict
    found = {"json_version": JSON_VERSION, "command": command, "resin_migrate": __version__}
    found.update(fields)
    return found


def emit(command, fields):
    # type: (str, dict) -> None
    sys.stdout.write(json.dumps(document(command, fields), indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def check_list(checks):
    # type: (list) -> list
    return [check.to_dict() for check in checks]
