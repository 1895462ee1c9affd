"""resin-migrate.pyz command line: argument parsing and exit codes only."""

import os
import sys

from .stdlib import require_modules, require_python

require_python()
require_modules()

import argparse  # noqa: E402  (after the check, which names a missing module clearly)

from . import __version__, log  # noqa: E402
from .backup import DEFAULT_TIMEOUT, DEFAULT_VOLUMES  # noqa: E402
from .errors import MigrateError  # noqa: E402
from .stage2names import GUARD_TIMEOUT  # noqa: E402

EXIT_CODES = """\
exit codes:
  0   success
  1   unexpected internal error (a bug: report it with /var/log/resin-migrate.log)
  2   usage error (bad command line)
  3   manifest.json missing, malformed or failing validation
  4   a bundle file is missing or does not match its sha256 in the manifest
  5   this Python cannot run the runtime: older than 3.4, or lacking standard modules it
      needs (the message names the package)
  6   an external tool is missing or failed (the message names it)
  7   a file of the bundle could not be downloaded from --bundle-url (network, HTTP error,
      certificate not accepted), after the retries
  10  refused: a check failed, or not confirmed; nothing on the disk was changed
  11  stage 1 failed after changing the device: run 'rollback' (or stage1 again)
  12  rollback failed, or there is nothing to roll back
"""


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
    preflight = _preflight(args)
    code = 0 if preflight.passed else 10
    if args.json:
        from .jsonout import check_list, emit
        emit("check", {"ok": preflight.passed, "exit_code": code,
                       "checks": check_list(preflight.checks),
                       "failed": check_list(preflight.failures())})
        return code
    for check in preflight.checks:
        mark = {True: "ok", False: "FAIL", None: "info"}[check.ok]
        print("{:<4}  {:<18}  {}".format(mark, check.name, check.found))
        if check.ok is False:
            if check.needed:
                print("{:<4}  {:<18}  needed: {}".format("", "", check.needed))
            if check.hint:
                print("{:<4}  {:<18}  {}".format("", "", check.hint))
    print("\n{}".format("all checks passed: 'plan' shows what stage1 will do"
                        if preflight.passed else
                        "some checks failed: nothing was changed; fix them and run "
                        "check again"))
    return code


def _plan_lines(preflight):
    target = preflight.target
    layout = target.layout
    manifest = target.manifest
    disk = target.disk
    from .plan import describe
    from .system import partition_path
    swap = partition_path(disk, target.swap.number)
    lines = [
        "1. try the backup script, if given (its DIR/VOLUME/ layout and size checked "
        "against what the Supervisor restores and resin-data holds); place the partitions",
        "2. record the partition table of {} and the swap signature of {} (UUID {}, LABEL "
        "{}) in /var/lib/resin-migrate".format(disk, swap,
                                              target.swap_probe.get("UUID", "-"),
                                              target.swap_probe.get("LABEL", "-")),
        "3. swapoff {}".format(swap),
        "4. comment out the swap line of /etc/fstab ({}); keep a copy".format(
            target.fstab_swap.spec if target.fstab_swap else "no line names it"),
        "5. replace {} (sectors {}-{}) with:".format(swap, target.swap.start,
                                                   target.swap.end - 1),
    ]
    if layout.new_extended is not None:
        lines.append("     {} extended, sectors {}-{}".format(
            partition_path(disk, layout.new_extended.number), layout.new_extended.start,
            layout.new_extended.end - 1))
    for flash in layout.flash:
        stream = describe(flash, manifest)["stream"]
        lines.append("     {} {:<12} {:<5} sectors {}-{} ({} MiB){}".format(
            partition_path(disk, flash.number), flash.label, flash.fs, flash.start,
            flash.end - 1, flash.size * 512 >> 20,
            ", from " + stream if stream else ", formatted empty"))
    lines += [
        "   writing sector 0 and the extended boot records itself, and tell the kernel of "
        "each changed partition (BLKPG; the root partition stays mounted)",
        "6. {} each stream onto its partition, read it back with O_DIRECT, compare "
        "sha256".format("download from {} and write".format(preflight.target.bundle)
                        if getattr(preflight.target.bundle, "remote", False) else "write"),
        "7. mkfs.ext4 flash-data; write manifest.json, stage2.env and the log",
        "8. the backup, taken last: --before-backup, the script, backup.tgz (0600) onto "
        "flash-data, read back, its size and sha256 into stage2.env",
        "9. add /etc/grub.d/42_resin-migrate booting {} from {} with '{}', update-grub, "
        "grub-reboot (one boot only)".format(manifest.boot.kernel, manifest.boot.kernel_label,
                                            manifest.boot.cmdline),
        "then, after the reboot, stage 2 writes resinOS ({} MiB, ending before sector {}; "
        "the {} MiB its filesystems use, the rest is skipped) over the start of {}".format(
            manifest.inner_image.raw_size >> 20, layout.protected_start,
            manifest.inner_image.stream_size >> 20, disk),
    ]
    network = preflight.target.network
    if network is not None:
        at = [index for index, line in enumerate(lines) if line.startswith("7. ")][0] + 1
        lines[at:at] = ["   then the network: " + line.strip() if index == 0 else "   " + line
                        for index, line in enumerate(network.lines())]
    return lines


def cmd_plan(args):
    preflight = _preflight(args)
    if not preflight.passed:
        for check in preflight.failures():
            sys.stderr.write("FAIL  {}: {}\n".format(check.name, check.found))
        sys.stderr.write("no plan: the checks above failed ('check' shows all of them)\n")
        if args.json:
            from .jsonout import check_list, emit
            emit("plan", {"ok": False, "exit_code": 10,
                          "failed": check_list(preflight.failures())})
        return 10
    if args.json:
        from .jsonout import emit
        from .plan import describe
        from .system import partition_path
        layout = preflight.target.layout
        manifest = preflight.target.manifest
        emit("plan", {"ok": True, "exit_code": 0, "failed": [],
                      "disk": preflight.target.disk,
                      "swap": partition_path(preflight.target.disk,
                                             preflight.target.swap.number),
                      "partitions": [describe(flash, manifest) for flash in layout.flash],
                      "protected_start": layout.protected_start,
                      "network": preflight.target.network.to_dict()
                      if preflight.target.network is not None else None,
                      "steps": _plan_lines(preflight)})
    else:
        print("\n".join(_plan_lines(preflight)))
    return 0


def _ask(preflight):
    """Show the plan (or, resuming, say so) and ask; never on a non-interactive stdin."""
    if preflight is None:
        question = "\nResume the interrupted stage 1? Type 'yes' to go on: "
    else:
        print("\n".join(_plan_lines(preflight)))
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
    from .status import stage1_record
    message, failed = None, []
    try:
        code = run_stage1(options)
    except MigrateError as exc:
        log.log.error("resin-migrate: %s", exc)
        code, message = exc.exit_code, str(exc)
        failed = check_list(getattr(exc, "checks", []))
    emit("stage1", dict(stage1_record(args.sysroot), ok=code == 0, exit_code=code,
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


def build_parser():
    parser = argparse.ArgumentParser(
        prog="resin-migrate.pyz",
        description="Migrate this device onto resinOS in place, from a bundle made by "
                    "'invoke build-flasher'. Run it as root. Order: check, plan, stage1 "
                    "(then reboot); rollback undoes stage1 before the reboot.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="resin-migrate " + __version__)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--bundle", default=default_bundle_dir(), metavar="DIR",
                       help="the bundle directory (default: the directory holding this .pyz)")
    where.add_argument("--bundle-url", metavar="URL",
                       help="the bundle's directory on an HTTPS server instead: check and plan "
                            "fetch only manifest.json and SHA256SUMS; stage1 downloads each "
                            "stream as it writes it onto its partition (nothing stored on "
                            "/), resuming an interrupted download with range requests. "
                            "Proxies from https_proxy/http_proxy/no_proxy. A resumed stage1 "
                            "uses the URL it started with")
    parser.add_argument("--ca-file", metavar="PEM",
                        help="with --bundle-url: trust only the CA certificate(s) in PEM for "
                             "the server's certificate (default: the system's CA store)")
    parser.add_argument("--auth-file", metavar="PATH",
                        help="with --bundle-url: send the one line in PATH (mode 0600) as the "
                             "Authorization header, e.g. 'Bearer TOKEN', to the bundle's server "
                             "only (not after a redirect elsewhere). Without it, credentials "
                             "for the server's host in ~/.netrc (or $NETRC) are sent as Basic "
                             "authentication. Never give a credential on the command line: "
                             "ps shows it")
    parser.add_argument("--allow-http", action="store_true",
                        help="with --bundle-url: allow a plain http:// URL. Nothing then "
                             "authenticates the server: the manifest's sha256 values are the "
                             "only protection, and they come over the same connection, so "
                             "they catch corruption but not a tampering network")
    parser.add_argument("--retries", type=int, default=8, metavar="N",
                        help="with --bundle-url: attempts after a failed connection or an "
                             "interrupted download, waiting 1, 2, 4 ... up to 60 s (default "
                             "8; a resumed download resets the count)")
    parser.add_argument("--disk", metavar="DEV",
                        help="the disk to migrate (default: the disk holding the root "
                             "filesystem; given, it must be that disk)")
    parser.add_argument("--sysroot", default="/", metavar="DIR",
                        help="the root filesystem of the system to migrate, mounted (default "
                             "/; another directory prepares a disk that is not running, with "
                             "GRUB run chrooted)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also print every command run")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, func, summary, description):
        sub = commands.add_parser(name, help=summary, description=description)
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
