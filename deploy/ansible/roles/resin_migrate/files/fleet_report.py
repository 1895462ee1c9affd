"""The fleet report: every record the resin_migrate role wrote, merged into one JSON file.

    python3 fleet_report.py REPORT HOSTS_JSON

REPORT.d/ holds one record per host (HOST.json, the role's resin_migrate_outcome); REPORT is
written from them (atomically) with a line per host of HOSTS_JSON (the play's hosts, a JSON
list) and any other recorded host. A host without a record is "not-attempted". A record is a
host's last: a host this run did not reach keeps the one of an earlier run (a migrated
device no longer answers on its old host key). The format is docs/fleet.md's.
"""

import json
import os
import sys
import tempfile
import time
from collections import Counter

REPORT_VERSION = 1


def load_records(directory):
    records = {}
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            if name.endswith(".json"):
                with open(os.path.join(directory, name)) as handle:
                    record = json.load(handle)
                records[record.get("host", name[:-5])] = record
    return records


def build(records, hosts):
    rows = []
    for host in sorted(set(hosts) | set(records)):
        record = records.get(host)
        if record is None:
            record = {"host": host, "result": "not-attempted", "reason": None}
        times = {key: int(value) for key, value in (record.get("times") or {}).items()}
        if "started" in times and "ended" in times:
            times["seconds"] = times["ended"] - times["started"]
        rows.append(dict(record, times=times, in_play=host in hosts))
    return {"report_version": REPORT_VERSION,
            "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "summary": dict(Counter(row["result"] for row in rows)),
            "hosts": rows}


def write_atomic(path, text):
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".report-")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)


def main(argv):
    if len(argv) != 3:
        sys.stderr.write(__doc__)
        return 2
    report, hosts = argv[1], json.loads(argv[2])
    write_atomic(report, json.dumps(build(load_records(report + ".d"), hosts), indent=2,
                                    sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
