"""Initramfs archives without root, without `cpio`, and without a staging directory.

An `Archive` is a manifest: archive path -> what to put there (a host file streamed at
write time, bytes, a directory, a symlink or a device node). Parents are added on the
way. `add_host_path` mirrors a host path *as the host resolves it*: every symlink met on
the way (e.g. Debian's /lib -> usr/lib) becomes a symlink in the archive too, so ELF
interpreters, rpaths and Python's prefix all work unchanged at the same absolute paths.
`digest()` hashes the manifest (names, modes, sizes, mtimes, link targets, inline
bytes), cheap enough to decide whether a cached archive is still current.

`write()` streams the newc format the kernel's initramfs unpacker reads.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

TRAILER = "TRAILER!!!"
COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    mode: int  # full st_mode: type and permission bits
    source: Path | None = None  # host file whose contents are streamed
    data: bytes = b""  # inline contents (regular files) or link target (symlinks)
    mtime: int = 0
    rdev: tuple[int, int] = (0, 0)

    @property
    def size(self) -> int:
        if self.source is not None:
            return self.source.stat().st_size
        return len(self.data)


def _norm(path: str | PurePosixPath) -> str:
    parts = [p for p in str(path).split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"archive path {path!r} contains '..'")
    return "/".join(parts)


class Archive:
    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self._links: set[str] = set()  # names of symlink entries, for `resolve`'s fast path

    # --- building ---------------------------------------------------------------------------
    def directory(self, path: str, mode: int = 0o755) -> None:
        name = self.resolve(path)
        existing = self.entries.get(name)
        if not name:
            return
        if existing is not None:
            if not stat.S_ISDIR(existing.mode) and not stat.S_ISLNK(existing.mode):
                raise ValueError(f"{name} is already a file in the archive")
            return
        self._parents(name)
        self.entries[name] = Entry(stat.S_IFDIR | mode)

    def file(self, path: str, data: bytes | Path, mode: int = 0o644, mtime: int = 0) -> None:
        name = self.resolve(path)
        self._parents(name)
        if isinstance(data, Path):
            st = data.stat()
            self.entries[name] = Entry(stat.S_IFREG | mode, source=data, mtime=mtime or int(st.st_mtime))
        else:
            self.entries[name] = Entry(stat.S_IFREG | mode, data=data, mtime=mtime)

    def symlink(self, path: str, target: str) -> None:
        name = self.resolve(path)
        self._parents(name)
        self.entries[name] = Entry(stat.S_IFLNK | 0o777, data=target.encode())
        self._links.add(name)

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = self.resolve(path)
        self._parents(name)
        self.entries[name] = Entry(stat.S_IFCHR | mode, rdev=(major, minor))

    def resolve(self, path: str) -> str:
        """`path` with every directory component that is a symlink in the archive followed."""
        name = _norm(path)
        parts = name.split("/")
        prefix = ""
        for part in parts[:-1]:
            prefix = f"{prefix}/{part}" if prefix else part
            if prefix in self._links:
                break
        else:
            return name  # no symlink on the way (the common case)
        current = PurePosixPath()
        hops = 0
        while len(parts) > 1:
            candidate = current / parts.pop(0)
            entry = self.entries.get(str(candidate))
            if entry is not None and stat.S_ISLNK(entry.mode):
                hops += 1
                if hops > 40:
                    raise OSError(f"too many symlinks resolving {path}")
                target = entry.data.decode()
                base = PurePosixPath("/") if target.startswith("/") else PurePosixPath("/", current)
                parts = _norm(os.path.normpath(base / target)).split("/") + parts
                current = PurePosixPath()
            else:
                current = candidate
        return _norm(current / parts[0]) if parts else _norm(current)

    def _parents(self, name: str) -> None:
        parent, sep, _ = name.rpartition("/")
        if sep and parent not in self.entries:
            self.directory(parent)

    def add_host_path(self, host_path: str | Path) -> str:
        """Mirror `host_path` (a file or symlink chain) at the same absolute path; returns
        the archive name of the real file it resolves to."""
        current = PurePosixPath("/")
        remaining = list(PurePosixPath(os.path.abspath(host_path)).parts[1:])
        hops = 0
        while remaining:
            part = remaining.pop(0)
            candidate = current / part
            st = os.lstat(candidate)
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > 40:
                    raise OSError(f"too many symlinks resolving {host_path}")
                target = os.readlink(candidate)
                self.symlink(str(candidate), target)
                base = PurePosixPath("/") if target.startswith("/") else current
                resolved = PurePosixPath(os.path.normpath(base / target))
                remaining = list(resolved.parts[1:]) + remaining
                current = PurePosixPath("/")
                continue
            current = candidate
            if remaining:
                if not stat.S_ISDIR(st.st_mode):
                    raise NotADirectoryError(str(candidate))
                self.directory(str(candidate), stat.S_IMODE(st.st_mode))
            elif stat.S_ISDIR(st.st_mode):
                self.directory(str(candidate), stat.S_IMODE(st.st_mode))
            else:
                self.file(str(candidate), Path(candidate), stat.S_IMODE(st.st_mode), int(st.st_mtime))
        return _norm(current)

    def add_host_tree(self, root: str | Path, skip: tuple[str, ...] = ()) -> None:
        """Mirror a host directory tree at the same absolute path (symlinks kept as links).
        `skip` holds glob patterns for names (bare, or relative to `root`) to leave out."""
        root = Path(os.path.abspath(root))
        real_root = Path("/" + self.add_host_path(root))
        for dirpath, dirnames, filenames in os.walk(real_root):
            rel_dir = Path(dirpath).relative_to(real_root)
            kept = []
            for d in sorted(dirnames):
                rel = (rel_dir / d).as_posix()
                if _skipped(d, rel, skip):
                    continue
                full = Path(dirpath, d)
                if full.is_symlink():
                    self.symlink(str(full), os.readlink(full))
                else:
                    self.directory(str(full), stat.S_IMODE(full.stat().st_mode))
                    kept.append(d)
            dirnames[:] = kept
            for f in sorted(filenames):
                rel = (rel_dir / f).as_posix()
                if _skipped(f, rel, skip):
                    continue
                full = Path(dirpath, f)
                st = full.lstat()
                if stat.S_ISLNK(st.st_mode):
                    self.symlink(str(full), os.readlink(full))
                elif stat.S_ISREG(st.st_mode):
                    self.file(str(full), full, stat.S_IMODE(st.st_mode), int(st.st_mtime))

    # --- identity and output ------------------------------------------------------------------
    def digest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.entries):
            e = self.entries[name]
            if e.source is not None:
                st = e.source.stat()
                what = f"{e.source}:{st.st_size}:{st.st_mtime_ns}".encode()
            else:
                what = hashlib.sha256(e.data).digest()
            h.update(f"{name}\0{e.mode:o}\0{e.mtime}\0{e.rdev}\0".encode() + what + b"\n")
        return h.hexdigest()

    def write(self, out: IO[bytes]) -> int:
        """Write the newc archive (parents first) to `out`; returns the bytes written."""
        written = 0
        for ino, name in enumerate(sorted(self.entries), start=1):
            written += _write_entry(out, ino, name, self.entries[name])
        written += _write_header(out, 0, TRAILER, 0, 0, 0, 1, (0, 0))
        return written


def _skipped(name: str, rel: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(rel, p) for p in patterns)


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


def _write_header(
    out: IO[bytes], ino: int, name: str, mode: int, size: int, mtime: int, nlink: int, rdev: tuple[int, int]
) -> int:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
    header += b"\0" * _pad(len(header))
    out.write(header)
    return len(header)


def _write_entry(out: IO[bytes], ino: int, name: str, e: Entry) -> int:
    nlink = 2 if stat.S_ISDIR(e.mode) else 1
    if e.source is None:
        n = _write_header(out, ino, name, e.mode, len(e.data), e.mtime, nlink, e.rdev)
        out.write(e.data + b"\0" * _pad(len(e.data)))
        return n + len(e.data) + _pad(len(e.data))
    with e.source.open("rb") as src:
        size = os.fstat(src.fileno()).st_size
        n = _write_header(out, ino, name, e.mode, size, e.mtime, nlink, e.rdev)
        copied = 0
        while chunk := src.read(min(COPY_CHUNK, size - copied)):
            out.write(chunk)
            copied += len(chunk)
        if copied != size:
            raise OSError(f"{e.source} changed size while archiving it")
    out.write(b"\0" * _pad(size))
    return n + size + _pad(size)
