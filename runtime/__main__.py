"""resin-migrate.pyz command line: argument parsing and exit codes only."""

import os
import sys

from .stdlib import require_modules, require_python

require_python()
require_modules()

import argparse  # noqa: E402  (after the check, which names a missing module clearly)

from . import __version__, log  # noqa: E402
from .backup import DEFAULT_TIMEOUT, DEFAULT_VOLUMES  # noqa: E402
from .errors import EXIT_CODES, MigrateError  # noqa: E402
from .stage2names import GUARD_TIMEOUT  # noqa: E402


def default_bundle_dir():
    # type: () -> str
    """The directory holding the running .pyz (or the runtime package when run from source)."""
    here = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else os.getcwd()
    return os.path.dirname(here)


def _source(args):
    """The bundle: the directory --bundle, or the URL --bundle-url (one object per run, so
    the manifest fetched for the checks is the one stage 1 writes from)."""
    from .source import LocalBundle, RemoteBundle
    if getattr(args, "source", None) is None:
        if args.bundle_url:
            from .fetch import Fetcher
            fetcher = Fetcher(ca_file=args.ca_file and os.path.abspath(args.ca_file),
                              allow_http=args.allow_http, retries=args.retries,
                              auth_file=args.auth_file and os.path.abspath(args.auth_file))
            args.source = RemoteBundle(args.bundle_url, fetcher)
        else:
            args.source = LocalBundle(args.bundle)
    return args.source


def cmd_verify(args):
    source = _source(args)
    manifest = source.manifest()
    checked = source.verify_all(manifest)
    print("bundle {}: manifest schema {}, built by resin-migrate {} from {}".format(
        source, manifest.schema, manifest.builder_version, manifest.source.name))
    for name in checked:
        print("  ok  {}".format(name))
    return 0


def _preflight(args, skip_streams=False):
    from .preflight import Preflight
    return Preflight(args.sysroot, _source(args), args.disk, skip_streams=skip_streams,
                     network_ok=getattr(args, "network_ok", False)).run()


def cmd_check(args):
    from .render import check_fields, check_text
    preflight = _preflight(args)
    code = 0 if preflight.passed else 10
    if args.json:
        from .jsonout import emit
        emit("check", check_fields(preflight, code))
    else:
        print(check_text(preflight))
    return code


def cmd_plan(args):
    from .render import plan_fields, plan_lines, plan_refusal_fields
    preflight = _preflight(args)
    if not preflight.passed:
        for check in preflight.failures():
            sys.stderr.write("FAIL  {}: {}\n".format(check.name, check.found))
        sys.stderr.write("no plan: the checks above failed ('check' shows all of them)\n")
        if args.json:
            from .jsonout import emit
            emit("plan", plan_refusal_fields(preflight))
        return 10
    if args.json:
        from .jsonout import emit
        emit("plan", plan_fields(preflight))
    else:
        print("\n".join(plan_lines(preflight)))
    return 0


def _ask(preflight):
    """Show the plan (or, resuming, say so) and ask; never on a non-interactive stdin."""
    if preflight is None:
        question = "\nResume the interrupted stage 1? Type 'yes' to go on: "
    else:
        from .render import plan_lines
        print("\n".join(plan_lines(preflight)))
        question = "\nThis repartitions {}. Type 'yes' to go on: ".format(preflight.target.disk)
    if not sys.stdin.isatty():
        return False
    return input(question).strip() == "yes"


def _seconds(text):
    # type: (str) -> int
    value = int(text)
    if value < 60:
        raise argparse.ArgumentTypeError("at least 60 seconds: reading the image alone takes "
                                         "that on a slow disk")
    return value


def _volumes(text):
    # type: (str) -> tuple
    """--backup-volumes: names a balena release may give its volumes (no path, no dotfile)."""
    import re
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    bad = [name for name in names if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name)]
    if not names or bad:
        raise argparse.ArgumentTypeError("expected volume names separated by commas, found "
                                         "{!r}".format(text))
    return names


def cmd_stage1(args):
    from .stage1 import Options, run_stage1
    options = Options(sysroot=args.sysroot, bundle=args.bundle, disk=args.disk,
                      backup_script=args.backup_script, yes=args.yes,
                      backup_volumes=args.backup_volumes, backup_timeout=args.backup_timeout,
                      before_backup=args.before_backup, reboot=args.reboot, confirm=_ask,
                      source=_source(args), network_ok=args.network_ok,
                      guard_timeout=args.stage2_timeout)
    if not args.json:
        return run_stage1(options)
    from .jsonout import check_list, emit
    from .state import State
    from .status import stage1_record
    message, failed = None, []
    try:
        code = run_stage1(options)
    except MigrateError as exc:
        log.log.error("resin-migrate: %s", exc)
        code, message = exc.exit_code, str(exc)
        failed = check_list(getattr(exc, "checks", []))
    emit("stage1", dict(stage1_record(State(args.sysroot)), ok=code == 0, exit_code=code,
                        error=message, failed=failed))
    return code


def cmd_rollback(args):
    from .errors import MigrateError
    from .rollback import RollbackError, rollback
    try:
        rollback(args.sysroot)
    except RollbackError:
        raise
    except MigrateError as exc:     # a tool failed half-way: still a failed rollback (12)
        raise RollbackError("rollback stopped: {}\nThe state file is kept: run rollback "
                            "again, it repeats every step".format(exc)) from exc
    return 0


def cmd_status(args):
    from .status import status
    lines_of_journal = 20
    found = status(args.sysroot)
    if args.json:
        from .jsonout import emit
        emit("status", found)
    else:
        print(found["summary"])
        progress = found.get("progress")
        if progress:
            print("{}: {}% ({} of {} MiB{})".format(
                progress["what"], progress["percent"], progress["done"] >> 20,
                progress["total"] >> 20, ", downloaded {} of {} MiB from {}".format(
                    progress["downloaded"] >> 20, progress["download_size"] >> 20,
                    progress["url"]) if "url" in progress else ""))
        if found["log_tail"]:
            print("\nlast lines of {}:".format(found["log"]))
            print("\n".join(found["log_tail"]))
        if found["stage2_log_tail"]:
            print("\nlast lines of stage 2's log on flash-data:")
            print("\n".join(found["stage2_log_tail"]))
        if found["stage2_journal"]:
            print("\nstage 2's journal on flash-data:")
            print("\n".join(found["stage2_journal"][-lines_of_journal:]))
    return 0


def global_options(after_command):
    # type: (bool) -> argparse.ArgumentParser
    """The options of every command, accepted before its name and after it. After it, the
    command's own parser reads them: there their defaults are SUPPRESS, so that a value
    given before the name is not replaced by a default."""
    def default(value):
        return argparse.SUPPRESS if after_command else value

    options = argparse.ArgumentParser(add_help=False)
    where = options.add_mutually_exclusive_group()
    where.add_argument("--bundle", default=default(default_bundle_dir()), metavar="DIR",
                       help="the bundle directory (default: the directory holding this .pyz)")
    where.add_argument("--bundle-url", default=default(None), metavar="URL",
                       help="the bundle's directory on an HTTPS server instead: check and plan "
                            "fetch only manifest.json and SHA256SUMS; stage1 downloads each "
                            "stream as it writes it onto its partition (nothing stored on "
                            "/), resuming an interrupted download with range requests. "
                            "Proxies from https_proxy/http_proxy/no_proxy. A resumed stage1 "
                            "uses the URL it started with")
    options.add_argument("--ca-file", default=default(None), metavar="PEM",
                         help="with --bundle-url: trust only the CA certificate(s) in PEM for "
                             "the server's certificate (default: the system's CA store)")
    options.add_argument("--auth-file", default=default(None), metavar="PATH",
                         help="with --bundle-url: send the one line in PATH (mode 0600) as the "
                             "Authorization header, e.g. 'Bearer TOKEN', to the bundle's server "
                             "only (not after a redirect elsewhere). Without it, credentials "
                             "for the server's host in ~/.netrc (or $NETRC) are sent as Basic "
                             "authentication. Never give a credential on the command line: "
                             "ps shows it")
    options.add_argument("--allow-http", action="store_true", default=default(False),
                         help="with --bundle-url: allow a plain http:// URL. Nothing then "
                             "authenticates the server: the manifest's sha256 values are the "
                             "only protection, and they come over the same connection, so "
                             "they catch corruption but not a tampering network")
    options.add_argument("--retries", type=int, default=default(8), metavar="N",
                         help="with --bundle-url: attempts after a failed connection or an "
                             "interrupted download, waiting 1, 2, 4 ... up to 60 s (default "
                             "8; a resumed download resets the count)")
    options.add_argument("--disk", default=default(None), metavar="DEV",
                         help="the disk to migrate (default: the disk holding the root "
                             "filesystem; given, it must be that disk)")
    options.add_argument("--sysroot", default=default("/"), metavar="DIR",
                         help="the root filesystem of the system to migrate, mounted (default "
                             "/; another directory prepares a disk that is not running, with "
                             "GRUB run chrooted)")
    options.add_argument("-v", "--verbose", action="store_true", default=default(False),
                         help="also print every command run")
    return options


def build_parser():
    parser = argparse.ArgumentParser(
        prog="resin-migrate.pyz",
        description="Migrate this device onto resinOS in place, from a bundle made by "
                    "'invoke build-flasher'. Run it as root. Order: check, plan, stage1 "
                    "(then reboot); rollback undoes stage1 before the reboot.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[global_options(after_command=False)])
    parser.add_argument("--version", action="version", version="resin-migrate " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    after = global_options(after_command=True)

    def add(name, func, summary, description):
        sub = commands.add_parser(name, help=summary, description=description,
                                  parents=[after])
        sub.set_defaults(func=func)
        return sub

    add("verify", cmd_verify, "check the bundle's files against manifest.json; changes nothing",
        "Validate manifest.json and check the size and sha256 of every stream. Changes nothing.")
    check = add("check", cmd_check, "preflight: every check stage1 needs; changes nothing",
                "Check root, OS, boot mode, disk and table, the swap partition, memory for "
                "swapoff, tools, bundle integrity, room for the flasher, that the resinOS "
                "image ends before the flash partitions, GRUB, and that the network "
                "configuration can be carried into resinOS. Changes nothing.")
    check.add_argument("--json", action="store_true",
                       help="print the checks as JSON (docs/json.md)")
    plan = add("plan", cmd_plan, "the exact steps stage1 would take here; changes nothing",
               "Run the checks, then print the devices, sectors, sizes and files stage1 "
               "would write. Changes nothing.")
    plan.add_argument("--json", action="store_true",
                      help="print the plan as JSON (docs/json.md)")
    stage1 = add("stage1", cmd_stage1, "swap area -> flasher partitions, one-shot GRUB entry",
                 "Run the checks, then: a trial of the backup script, swapoff, fstab, "
                 "repartition the swap area, stream-write and verify the flasher, flash-data "
                 "with the stage 2 inputs, the backup (taken last), and a GRUB entry for the "
                 "next boot only. Resumable: run it again after an interruption. Run again "
                 "after it completed, it takes the backup again. Undo with rollback (before "
                 "rebooting).")
    stage1.add_argument("--backup-script", metavar="PATH",
                        help="run PATH DIR on an empty DIR (mode 0700); DIR becomes "
                             "backup.tgz (mode 0600) in resin-data, which the balena "
                             "Supervisor restores into the app's volumes: put the data into "
                             "DIR/VOLUME/ for each volume (DIR/resin-data/ for a "
                             "single-container app); anything else at the top of DIR is "
                             "refused. Its output goes to the log")
    stage1.add_argument("--backup-volumes", type=_volumes, default=",".join(DEFAULT_VOLUMES),
                        metavar="NAME[,NAME...]",
                        help="the volumes of the app's release the backup may fill, the "
                             "top-level directories of DIR (default: %(default)s)")
    stage1.add_argument("--before-backup", metavar="COMMAND",
                        help="run COMMAND (by sh -c) right before the backup is taken, at "
                             "the end of stage 1: e.g. stop the app, so that its files are "
                             "consistent (its output goes to the log; a failure stops stage "
                             "1, which resumes there)")
    stage1.add_argument("--backup-timeout", type=int, default=DEFAULT_TIMEOUT,
                        metavar="SECONDS",
                        help="stop the backup script after this long and refuse (default: "
                             "%(default)s)")
    stage1.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    stage1.add_argument("--json", action="store_true",
                        help="at the end, print the outcome as JSON on stdout (the log stays "
                             "on stderr): exit code, error, failed checks, steps done")
    stage1.add_argument("--reboot", action="store_true",
                        help="reboot into the flasher when stage 1 is complete")
    stage1.add_argument("--stage2-timeout", type=_seconds, default=GUARD_TIMEOUT,
                        metavar="SECONDS",
                        help="stage 2's guard: the flasher must finish its checks (reading "
                             "the image and the backup) within this many seconds of starting, "
                             "else it brings this system back; after its point of no return "
                             "a step without progress for as long reboots the flasher, which "
                             "resumes (default: %(default)s)")
    add("rollback", cmd_rollback, "undo stage1 (before the reboot, or after stage 2 gave up "
        "and brought this system back)",
        "Restore the partition table, sector 0's boot code, the swap (same UUID and label), "
        "/etc/fstab, and remove the GRUB entry. Works after an interrupted stage1 too, and "
        "after a flasher that refused (see status).")
    for sub in (check, plan, stage1):
        sub.add_argument("--network-ok", action="store_true",
                         help="go on (with a warning) when the device's working route cannot "
                              "be carried into resinOS (a bond, VLAN, bridge, 802.1X or "
                              "IPv6-only static setup): it may come up unreachable")
    status = add("status", cmd_status, "where the migration stands, and the last log lines",
                 "Show the state of stage 1, the last lines of /var/log/resin-migrate.log, and "
                 "what stage 2 logged and recorded in its journal on flash-data (after a "
                 "flasher boot that brought this system back: why). From resinOS or a rescue "
                 "shell: mount flash-data and read resin-migrate-stage2.log.")
    status.add_argument("--json", action="store_true",
                        help="print the status as JSON (docs/json.md)")
    return parser


def main(argv=None):
    log.tolerant_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    if args.bundle_url and any(word == "--bundle" or word.startswith("--bundle=")
                               for word in given):
        parser.error("argument --bundle-url: not allowed with argument --bundle")
    log.setup(verbose=args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    args.bundle = os.path.abspath(args.bundle)
    args.sysroot = os.path.abspath(args.sysroot)
    try:
        return args.func(args)
    except MigrateError as exc:
        log.log.error("resin-migrate: %s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.log.error("resin-migrate: interrupted; run 'status' to see where it stopped")
        return 11


if __name__ == "__main__":
    sys.exit(main())
