"""Firecracker's snapshot flags, `--snapshot-version` and `--describe-snapshot FILE`.

Firecracker prints its snapshot data format version (`v6.0.0` in v1.12.1) or the version of
a snapshot state file, then exits. embervm has no snapshots yet, so there is no format to
report: both flags exist (a client passing them gets an answer, not an argument error) and
refuse loudly with GenericError. The snapshot work fills `handle` in.
"""

from __future__ import annotations

import argparse
import sys

from shared import exitcodes

NO_SNAPSHOTS = "embervm has no snapshots yet, so it has no snapshot data format to report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--snapshot-version", action="store_true", help="Print the supported data format version.")
    parser.add_argument(
        "--describe-snapshot", metavar="FILE", help="Print the data format version of the snapshot state file."
    )


def handle(args: argparse.Namespace) -> int | None:
    """The exit code if a snapshot flag was given (the process does nothing else), else None."""
    if args.snapshot_version:
        print(f"embervm: --snapshot-version: {NO_SNAPSHOTS}.", file=sys.stderr)
        return exitcodes.GENERIC_ERROR
    if args.describe_snapshot is not None:
        print(f"embervm: --describe-snapshot {args.describe_snapshot}: {NO_SNAPSHOTS}.", file=sys.stderr)
        return exitcodes.GENERIC_ERROR
    return None
