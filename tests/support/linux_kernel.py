"""Debian's stock cloud kernel, fetched once and cached outside the repository.

Tests that boot a real Linux use `debian_kernel()`: it resolves the kernel package
that `linux-image-cloud-amd64` depends on, downloads it with `apt-get download`,
takes /boot/vmlinuz-* out of it with `dpkg-deb`, and extracts the ELF vmlinux from
that bzImage. Everything lands in ${EMBERVM_CACHE:-~/.cache/embervm}/linux/<package>/
and later calls reuse it, offline too. Concurrent callers serialise on a lock file.

    python -m tests.support.linux_kernel     # fetch (if needed) and print the paths
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from shared.boot.vmlinux import extract_vmlinux  # noqa: E402

METAPACKAGE = "linux-image-cloud-amd64"


class KernelFetchError(RuntimeError):
    """The Debian kernel could not be resolved, downloaded or unpacked."""


@dataclass(frozen=True)
class KernelFiles:
    bzimage: Path
    vmlinux: Path
    version: str  # the kernel release, e.g. "6.1.0-56-cloud-amd64"
    config: Path | None = None


def cache_dir() -> Path:
    base = os.environ.get("EMBERVM_CACHE") or Path.home() / ".cache" / "embervm"
    return Path(base) / "linux"


def _run(args: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise KernelFetchError(f"{args[0]} is not installed (this needs a Debian-based machine)") from None
    if proc.returncode != 0:
        raise KernelFetchError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _depends(package: str) -> str | None:
    out = _run(["apt-cache", "depends", "--important", package])
    for line in out.splitlines():
        kind, _, name = line.strip().partition(": ")
        if kind in ("Depends", "|Depends") and name.startswith("linux-image-"):
            return name.strip("<>")
    return None


def resolve_package() -> str:
    """The versioned kernel package the metapackage depends on, updating apt lists if needed."""
    try:
        name = _depends(METAPACKAGE)
    except KernelFetchError:
        name = None
    if name is None:
        _run(["apt-get", "update", "-q"])
        name = _depends(METAPACKAGE)
    if name is None:
        raise KernelFetchError(f"apt knows no kernel package that {METAPACKAGE} depends on")
    return name


def _cached(directory: Path) -> KernelFiles | None:
    marker = directory / "version"
    if not marker.is_file():
        return None
    version = marker.read_text().strip()
    bzimage, vmlinux = directory / f"vmlinuz-{version}", directory / f"vmlinux-{version}"
    if not (bzimage.is_file() and vmlinux.is_file()):
        return None
    config = directory / f"config-{version}"
    return KernelFiles(bzimage, vmlinux, version, config if config.is_file() else None)


def _newest_cached() -> KernelFiles | None:
    found = [f for d in sorted(cache_dir().glob("linux-image-*")) if (f := _cached(d))]
    return found[-1] if found else None


@contextmanager
def _locked() -> Iterator[None]:
    cache_dir().mkdir(parents=True, exist_ok=True)
    with (cache_dir() / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _unpack_boot(deb: Path, dest: Path) -> str:
    """Extract boot/vmlinuz-* and boot/config-* from `deb` into `dest`; returns the release."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    version = None
    # A streamed tarfile does not close the file object it was given: close the pipe ourselves.
    with proc.stdout, tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if not member.isfile() or not name.startswith(("boot/vmlinuz-", "boot/config-")):
                continue
            src = tar.extractfile(member)
            assert src is not None
            base = Path(name).name
            with (dest / base).open("wb") as out:
                shutil.copyfileobj(src, out)
            if base.startswith("vmlinuz-"):
                version = base.removeprefix("vmlinuz-")
    if proc.wait() != 0:
        raise KernelFetchError(f"dpkg-deb could not read {deb}")
    if version is None:
        raise KernelFetchError(f"{deb.name} has no boot/vmlinuz-*")
    return version


def _fetch(package: str, directory: Path) -> KernelFiles:
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".fetch-") as tmp_name:
        tmp = Path(tmp_name)
        _run(["apt-get", "download", "-q", package], cwd=tmp)
        debs = list(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise KernelFetchError(f"apt-get download {package} left {len(debs)} .deb files")
        unpacked = tmp / "boot"
        unpacked.mkdir()
        version = _unpack_boot(debs[0], unpacked)
        vmlinux = extract_vmlinux((unpacked / f"vmlinuz-{version}").read_bytes())
        (unpacked / f"vmlinux-{version}").write_bytes(vmlinux)
        (unpacked / "version").write_text(version + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        unpacked.rename(directory)
    files = _cached(directory)
    if files is None:
        raise KernelFetchError(f"kernel files missing from {directory} right after fetching them")
    return files


def debian_kernel() -> KernelFiles:
    """Debian's current cloud kernel (bzImage, extracted vmlinux), fetched on first use.

    With apt unreachable, the newest kernel already in the cache is used instead.
    """
    with _locked():
        try:
            package = resolve_package()
        except KernelFetchError:
            cached = _newest_cached()
            if cached is None:
                raise
            return cached
        directory = cache_dir() / package
        return _cached(directory) or _fetch(package, directory)


def main() -> int:
    try:
        files = debian_kernel()
    except KernelFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"version {files.version}\nbzImage {files.bzimage}\nvmlinux {files.vmlinux}")
    if files.config:
        print(f"config  {files.config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
