"""resin-migrate.pyz command line: argument parsing and exit codes only."""

import os
import sys

from .stdlib import require_modules

require_modules()

import argparse  # noqa: E402  (after the check, which names a missing module clearly)
import logging  # noqa: E402

from . import __version__  # noqa: E402
from .bundle import verify_streams  # noqa: E402
from .errors import MigrateError  # noqa: E402
from .manifest import load  # noqa: E402

EXIT_CODES = """\
exit codes:
  0  success
  1  unexpected internal error (a bug: report it with the log)
  2  usage error (bad command line)
  3  manifest.json missing, malformed or failing validation
  4  a bundle file is missing or does not match its sha256 in the manifest
  5  this Python lacks standard modules the runtime needs (the message names the package)
  6  an external tool is missing or failed (the message names it)
"""


def default_bundle_dir():
    # type: () -> str
    """The directory holding the running .pyz (or the runtime package when run from source)."""
    here = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else os.getcwd()
    return os.path.dirname(here)


def cmd_verify(args):
    manifest = load(args.bundle)
    checked = verify_streams(args.bundle, manifest)
    print("bundle {}: manifest schema {}, built by resin-migrate {} from {}".format(
        args.bundle, manifest.schema, manifest.builder_version, manifest.source.name))
    for name in checked:
        print("  ok  {}".format(name))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="resin-migrate.pyz",
        description="Migrate this device onto resinOS in place, from a bundle made by "
                    "'invoke build-flasher'. Run it as root from the bundle directory.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="resin-migrate " + __version__)
    parser.add_argument("--bundle", default=default_bundle_dir(), metavar="DIR",
                        help="the bundle directory (default: the directory holding this .pyz)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log every command run")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    verify = commands.add_parser(
        "verify", help="check the bundle's files against manifest.json; changes nothing",
        description="Read manifest.json, validate it, and check the size and sha256 of every "
                    "stream it names. Changes nothing.")
    verify.set_defaults(func=cmd_verify)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except MigrateError as exc:
        sys.stderr.write("resin-migrate: {}\n".format(exc))
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
