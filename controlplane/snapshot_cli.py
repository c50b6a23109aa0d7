"""Firecracker's snapshot flags, `--snapshot-version` and `--describe-snapshot FILE`.

Firecracker prints its snapshot data format version (`v6.0.0` in v1.12.1) or the version of
a snapshot state file, then exits. embervm prints the version of its own format
(shared.snapshot_format, docs/snapshots.md): the one it writes, or the one a state file has.
"""

from __future__ import annotations

import argparse
import sys

from shared import exitcodes, snapshot_format


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--snapshot-version", action="store_true", help="Print the supported data format version.")
    parser.add_argument(
        "--describe-snapshot", metavar="FILE", help="Print the data format version of the snapshot state file."
    )


def handle(args: argparse.Namespace) -> int | None:
    """The exit code if a snapshot flag was given (the process does nothing else), else None."""
    if args.snapshot_version:
        print(snapshot_format.version_string())
        return exitcodes.OK
    if args.describe_snapshot is not None:
        try:
            print(snapshot_format.describe(args.describe_snapshot))
        except snapshot_format.SnapshotFormatError as err:
            print(f"embervm: --describe-snapshot: {err}", file=sys.stderr)
            return exitcodes.GENERIC_ERROR
        return exitcodes.OK
    return None
