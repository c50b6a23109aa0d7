"""The `embervm` launcher: the fork-server client, started without site-packages.

pip's console-script wrapper runs under `site` (every `.pth` file of the virtualenv: an
editable install's import finder alone imports pathlib and importlib.util, ~20 ms here) and
imports `re` before it calls `controlplane.forkclient.main`: more than the fork server's
whole answer (docs/performance.md). This module writes a launcher that does what the wrapper
does, with `python -I -S`: no site-packages, no `.pth` files, no PYTHON* variables, no
user site, and the directory holding `controlplane` put on sys.path by its absolute path
(never the working directory). `controlplane.forkclient` needs nothing else until it falls
back to the cold path, and then it execs the interpreter as it normally starts.

    python -m controlplane.client_launcher PATH   # scripts/setup: PATH = .venv/bin/embervm
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import controlplane

TEMPLATE = """#!{python} -IS
# embervm's launcher (written by `python -m controlplane.client_launcher`): the fork-server
# client without site-packages; the cold path execs the interpreter as usual.
import sys
sys.path.insert(0, {root!r})
from controlplane.forkclient import main
main()
"""


def launcher_text(python: str, root: str) -> str:
    return TEMPLATE.format(python=python, root=root)


def package_root() -> str:
    """The directory that holds the `controlplane` package in use (a checkout, site-packages)."""
    return str(Path(next(iter(controlplane.__path__))).resolve().parent)


def write_launcher(path: str, python: str | None = None) -> None:
    """Write the launcher at `path` (replacing what is there, atomically), executable."""
    text = launcher_text(python or sys.executable, package_root())
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m controlplane.client_launcher PATH")
    write_launcher(sys.argv[1])
