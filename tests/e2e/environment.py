"""Prepare the nested-KVM test environment, cached outside the repository.

    .venv/bin/python -m tests.e2e.environment      # prepare (if needed) and print the paths

What it makes, under ${EMBERVM_CACHE:-~/.cache/embervm}/e2e/:

- Debian packages on the host: qemu-system-x86, busybox-static, lz4, e2fsprogs (apt-get
  install, only what is missing).
- The kernel: the package `linux-image-cloud-amd64` depends on, through
  `tests.support.linux_kernel` (bzImage, extracted vmlinux, config), and that package's
  modules, unpacked once into `linux-image-<release>/modules/`.
- `inner-<hash>.cpio.<z>`: the inner guests' initramfs: busybox, the virtio/vsock modules
  with their dependencies (read from each module's .modinfo), `/init` = guest/inner_init.sh.
- `rootfs-<hash>.ext4`: an ext4 root for the inner guest (`mkfs.ext4 -d`, no root needed).
- `outer-<hash>.cpio.<z>`: the outer VM's initramfs: busybox, the KVM modules, the project
  venv's Python (base interpreter, stdlib, the shared libraries `ldd` finds, the
  site-packages embervm needs) and embervm from the working tree, all at their host paths,
  the inner guest files under /e2e/guest, and `/init` = guest/outer_init.sh.

Every archive is named by a hash of its inputs (paths, sizes, mtimes, inline contents),
so a change to the working tree rebuilds the outer initramfs (a few seconds) and nothing
else. Concurrent callers serialise on a lock file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from tests.e2e.cpio import Archive  # noqa: E402
from tests.support.linux_kernel import KernelFiles, debian_kernel  # noqa: E402

HERE = Path(__file__).resolve().parent
GUEST_DIR = HERE / "guest"
FORMAT_VERSION = "1"  # bump to rebuild every cached archive

HOST_PACKAGES = {  # Debian package -> a command it provides
    "qemu-system-x86": "qemu-system-x86_64",
    "busybox-static": "busybox",
    "lz4": "lz4",
    "e2fsprogs": "mkfs.ext4",
}
OUTER_MODULES = ["irqbypass", "kvm", "kvm_amd", "kvm_intel", "tun"]  # one of kvm_amd/kvm_intel loads
INNER_MODULES = [
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport",
    "virtio_balloon",
    "virtio_rng",
]
# Repository folders copied into the outer VM (Python files only), at their host paths.
REPO_PACKAGES = ["controlplane", "vcpu_worker", "devices", "jailer", "shared", "guest", "tests", "bench", "scripts"]
# Parts of the standard library nothing here imports.
STDLIB_SKIP = (
    "test", "tests", "idle_test", "site-packages", "idlelib", "tkinter", "turtledemo", "ensurepip",
    "lib2to3", "pydoc_data", "config-3.*", "__phello__", "distutils", "*.opt-1.pyc", "*.opt-2.pyc",
    "_tkinter*.so", "_test*.so", "_ctypes_test*.so", "xxlimited*.so", "_xxtestfuzz*.so",
)  # fmt: skip
# Host tools the outer VM's jobs use besides busybox (with the libraries `ldd` finds).
OUTER_TOOLS = ["debugfs", "e2fsck"]  # read back and check what a guest wrote to an ext4 image, without mounting it
# Shared libraries that Python code may dlopen by name (ctypes), taken when the host has them.
EXTRA_LIBS = ["libseccomp.so.2", "libcap.so.2"]
ROOTFS_MIB = 32


class EnvironmentError_(RuntimeError):
    """The environment could not be prepared; the message says what to do."""


@dataclass(frozen=True)
class Environment:
    kernel: KernelFiles
    outer_initramfs: Path
    inner_initramfs: Path
    rootfs: Path
    qemu: str
    python: str  # the interpreter path inside the outer VM (same as on the host)

    @property
    def compression(self) -> str:
        return self.outer_initramfs.suffix.lstrip(".")


def cache_root() -> Path:
    base = os.environ.get("EMBERVM_CACHE") or Path.home() / ".cache" / "embervm"
    return Path(base) / "e2e"


def _run(args: list[str], **kwargs: object) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    except FileNotFoundError:
        raise EnvironmentError_(f"{args[0]} is not installed") from None
    if proc.returncode != 0:
        raise EnvironmentError_(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return str(proc.stdout)


@contextmanager
def locked() -> Iterator[None]:
    """The cache lock: one process builds or prunes cached files at a time."""
    cache_root().mkdir(parents=True, exist_ok=True)
    with (cache_root() / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# --- host packages ------------------------------------------------------------------------------
def _installed(package: str) -> bool:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return proc.returncode == 0 and "install ok installed" in proc.stdout


def ensure_host_packages() -> None:
    missing = [pkg for pkg, cmd in HOST_PACKAGES.items() if not (_installed(pkg) and shutil.which(cmd))]
    if not missing:
        return
    if os.geteuid() != 0:
        names = " ".join(missing)
        raise EnvironmentError_(f"missing Debian packages {names}: run `apt-get install {names}` as root")
    print(f"e2e: installing Debian packages: {' '.join(missing)}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    try:
        _run(install, env=env)
    except EnvironmentError_:
        _run(["apt-get", "update", "-q"], env=env)
        _run(install, env=env)


# --- kernel modules -----------------------------------------------------------------------------
def modules_dir(kernel: KernelFiles) -> Path:
    """/lib/modules/<release> of the kernel's package, unpacked once into the cache."""
    dest = cache_root() / f"linux-image-{kernel.version}" / "modules"
    if (dest / "kernel").is_dir():
        return dest
    with tempfile.TemporaryDirectory(dir=cache_root(), prefix=".modules-") as tmp_name:
        tmp = Path(tmp_name)
        _run(["apt-get", "download", "-q", f"linux-image-{kernel.version}"], cwd=tmp)
        debs = list(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise EnvironmentError_(f"apt-get download linux-image-{kernel.version} left {len(debs)} .deb files")
        _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")])
        unpacked = tmp / "root" / "lib" / "modules" / kernel.version
        if not (unpacked / "kernel").is_dir():
            raise EnvironmentError_(f"{debs[0].name} has no lib/modules/{kernel.version}/kernel")
        dest.parent.mkdir(parents=True, exist_ok=True)
        unpacked.rename(dest)
    return dest


def module_name(path: Path) -> str:
    name = path.name
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def module_bytes(path: Path) -> bytes:
    """A module's ELF, decompressed if the package ships it compressed (busybox insmod
    takes plain ELF)."""
    if path.name.endswith(".ko.xz"):
        import lzma

        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko.gz"):
        import gzip

        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return path.read_bytes()


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The key=value strings of a module's .modinfo section."""
    from io import BytesIO

    from elftools.elf.elffile import ELFFile

    section = ELFFile(BytesIO(elf)).get_section_by_name(".modinfo")
    if section is None:
        return {}
    info: dict[str, list[str]] = {}
    for item in section.data().split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


class ModuleIndex:
    """Modules of one kernel by name, and their load order with dependencies first."""

    def __init__(self, root: Path) -> None:
        self.paths = {module_name(p): p for p in root.rglob("*.ko*") if p.is_file()}
        self._elf: dict[str, bytes] = {}

    def elf(self, name: str) -> bytes:
        if name not in self._elf:
            self._elf[name] = module_bytes(self.paths[name])
        return self._elf[name]

    def depends(self, name: str) -> list[str]:
        values = modinfo(self.elf(name)).get("depends", [""])
        return [d.replace("-", "_") for v in values for d in v.split(",") if d]

    def load_order(self, wanted: Iterable[str]) -> list[str]:
        order: list[str] = []
        visiting: set[str] = set()

        def visit(name: str) -> None:
            name = name.replace("-", "_")
            if name in order:
                return
            if name not in self.paths:
                raise EnvironmentError_(f"the kernel package has no module {name}")
            if name in visiting:
                raise EnvironmentError_(f"module dependency cycle at {name}")
            visiting.add(name)
            for dep in self.depends(name):
                visit(dep)
            visiting.discard(name)
            order.append(name)

        for name in wanted:
            visit(name)
        return order

    def add_to(self, archive: Archive, directory: str, wanted: Iterable[str]) -> list[str]:
        """Put `wanted` and their dependencies in `directory`, with an `order` file for insmod."""
        order = self.load_order(wanted)
        for name in order:
            archive.file(f"{directory}/{name}.ko", self.elf(name))
        archive.file(f"{directory}/order", "".join(f"{n}\n" for n in order).encode())
        return order


# --- archive pieces -------------------------------------------------------------------------------
def _busybox() -> Path:
    path = shutil.which("busybox")
    if path is None:
        raise EnvironmentError_("busybox is not installed (apt-get install busybox-static)")
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        dynamic = any(seg["p_type"] == "PT_INTERP" for seg in ELFFile(f).iter_segments())
    if dynamic:
        raise EnvironmentError_(f"{path} is not the static busybox (apt-get install busybox-static)")
    return Path(path)


def add_base_system(archive: Archive) -> None:
    """Directories, /dev/console, busybox with every applet, and a few /etc files."""
    for top in ("bin", "sbin", "lib", "lib64"):  # keep the host's merged-/usr symlinks
        host = Path("/", top)
        if host.is_symlink():
            archive.symlink(top, os.readlink(host))
    for d in ("proc", "sys", "dev", "tmp", "run", "mnt", "root", "etc", "var/tmp"):
        archive.directory(d, 0o1777 if d in ("tmp", "var/tmp") else 0o755)
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3, 0o666)
    busybox = "/" + archive.add_host_path(_busybox())
    for applet in _run([busybox, "--list-full"]).split():
        name = archive.resolve(applet)
        if name not in archive.entries:
            archive.symlink(name, busybox)
    archive.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    archive.file("etc/group", b"root:x:0:\n")
    archive.file("etc/hosts", b"127.0.0.1 localhost\n")


def _compressor(kernel: KernelFiles) -> tuple[str, list[str]]:
    """(suffix, command) to compress an initramfs this kernel can unpack: lz4 (legacy frame
    format) if it was built with CONFIG_RD_LZ4, otherwise gzip -1."""
    config = kernel.config.read_text() if kernel.config else ""
    if "CONFIG_RD_LZ4=y" in config and shutil.which("lz4"):
        return "lz4", ["lz4", "-l", "-1", "-q", "-c"]
    return "gz", ["gzip", "-1", "-c"]


def _write_compressed(archive: Archive, dest: Path, command: list[str]) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as out:
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out)
        assert proc.stdin is not None
        try:
            archive.write(proc.stdin)
        finally:
            proc.stdin.close()
            code = proc.wait()
    if code != 0:
        tmp.unlink(missing_ok=True)
        raise EnvironmentError_(f"{' '.join(command)} failed ({code})")
    tmp.rename(dest)


def _prune(pattern: str, keep: Path, count: int = 2) -> None:
    """Delete older cached archives of one kind, keeping `keep` and the newest few."""
    old = sorted((p for p in cache_root().glob(pattern) if p != keep), key=lambda p: p.stat().st_mtime)
    for path in old[: max(0, len(old) - (count - 1))]:
        path.unlink(missing_ok=True)


def cached_archive(kind: str, archive: Archive, kernel: KernelFiles, extra_key: str = "") -> Path:
    suffix, command = _compressor(kernel)
    digest = hashlib.sha256(f"{FORMAT_VERSION}\0{extra_key}\0{archive.digest()}".encode()).hexdigest()[:16]
    dest = cache_root() / f"{kind}-{digest}.cpio.{suffix}"
    if not dest.is_file():
        _write_compressed(archive, dest, command)
    os.utime(dest)
    _prune(f"{kind}-*.cpio.*", dest)
    return dest


# --- inner guest ----------------------------------------------------------------------------------
VSOCK_HELPER_CFLAGS = [
    "-static", "-nostdlib", "-ffreestanding", "-fno-stack-protector", "-fno-pie", "-no-pie", "-O2",
    "-fcf-protection=none", "-fno-tree-loop-distribute-patterns", "-Wall", "-Wextra", "-Werror",
]  # fmt: skip


def vsock_helper() -> Path:
    """guest/vsock_e2e.c built freestanding (busybox has no AF_VSOCK), cached by its source."""
    source = GUEST_DIR / "vsock_e2e.c"
    key = hashlib.sha256(source.read_bytes() + " ".join(VSOCK_HELPER_CFLAGS).encode()).hexdigest()[:16]
    dest = cache_root() / f"vsock-e2e-{key}"
    if not dest.is_file():
        gcc = shutil.which("gcc")
        if gcc is None:
            raise EnvironmentError_("gcc is not installed (scripts/setup installs it)")
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
        _run([gcc, *VSOCK_HELPER_CFLAGS, "-o", str(tmp), str(source)])
        tmp.rename(dest)
        _prune("vsock-e2e-*", dest)
    return dest


def add_inner_system(archive: Archive, modules: ModuleIndex) -> None:
    add_base_system(archive)
    modules.add_to(archive, "lib/e2e-modules", INNER_MODULES)
    archive.file("bin/vsock-e2e", vsock_helper(), 0o755)
    archive.file("init", (GUEST_DIR / "inner_init.sh").read_bytes(), 0o755)


def inner_initramfs(kernel: KernelFiles, modules: ModuleIndex) -> Path:
    archive = Archive()
    add_inner_system(archive, modules)
    return cached_archive("inner", archive, kernel)


def rootfs_image(kernel: KernelFiles, modules: ModuleIndex) -> Path:
    """An ext4 image holding the same system as the inner initramfs plus files the block
    checks read back (e2e/hello)."""
    archive = Archive()
    add_inner_system(archive, modules)
    archive.file("sbin/init", (GUEST_DIR / "inner_init.sh").read_bytes(), 0o755)
    archive.file("e2e/hello", b"hello from the ext4 root image\n")
    archive.file("e2e/rootfs", b"")
    return ext4_image("rootfs", archive, ROOTFS_MIB, "e2e-root")


def ext4_image(kind: str, archive: Archive, size_mib: int, label: str) -> Path:
    """`archive` as an ext4 image of `size_mib` (mkfs.ext4 -d), cached by its contents as
    <cache>/<kind>-<digest>.ext4. Call with the cache lock held (`locked()`)."""
    digest = hashlib.sha256(f"{FORMAT_VERSION}\0{size_mib}\0{label}\0{archive.digest()}".encode()).hexdigest()[:16]
    dest = cache_root() / f"{kind}-{digest}.ext4"
    if dest.is_file():
        os.utime(dest)
        return dest
    with tempfile.TemporaryDirectory(dir=cache_root(), prefix=f".{kind}-") as tmp_name:
        staging = Path(tmp_name) / "root"
        _extract(archive, staging)
        image = Path(tmp_name) / "image.ext4"
        mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
        options = ["-q", "-F", "-L", label, "-E", "root_owner=0:0"]
        _run([mkfs, *options, "-d", str(staging), str(image), f"{size_mib}M"])
        image.rename(dest)
    _prune(f"{kind}-*.ext4", dest)
    return dest


def _extract(archive: Archive, dest: Path) -> None:
    """Materialise an archive as a directory (for mkfs.ext4 -d); device nodes are left
    out (the inner init mounts devtmpfs)."""
    import stat

    dest.mkdir(parents=True)
    for name in sorted(archive.entries):
        e = archive.entries[name]
        path = dest / name
        if stat.S_ISDIR(e.mode):
            path.mkdir(exist_ok=True)
            path.chmod(stat.S_IMODE(e.mode))
        elif stat.S_ISLNK(e.mode):
            path.symlink_to(e.data.decode())
        elif stat.S_ISREG(e.mode):
            if e.source is not None:
                shutil.copyfile(e.source, path)
            else:
                path.write_bytes(e.data)
            path.chmod(stat.S_IMODE(e.mode))


# --- the Python runtime -----------------------------------------------------------------------------
def _venv_python() -> Path:
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    return venv if venv.exists() else Path(sys.executable)


def _runtime_files(python: Path) -> dict[str, list[str]]:
    """Ask the venv's interpreter where its pieces are and which installed files embervm's
    dependency closure needs."""
    probe = r"""
import importlib.metadata as md, json, re, sys, sysconfig
def closure(name, seen):
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen: return
    try: dist = md.distribution(name)
    except md.PackageNotFoundError: return
    seen[key] = dist
    for req in dist.requires or []:
        if "extra ==" in req: continue
        closure(re.split(r"[\s;<>=!~\[(]", req, 1)[0], seen)
seen = {}
closure("embervm", seen)
files = []
for dist in seen.values():
    files += [str(dist.locate_file(f)) for f in dist.files or []]
print(json.dumps({"files": files, "stdlib": [sysconfig.get_paths()["stdlib"]],
    "base_executable": [sys._base_executable], "prefix": [sys.prefix], "dists": sorted(seen)}))
"""
    return json.loads(_run([str(python), "-I", "-c", probe], cwd="/"))  # type: ignore[no-any-return]


def _ldd(paths: list[str]) -> set[str]:
    libs: set[str] = set()
    for i in range(0, len(paths), 200):
        proc = subprocess.run(["ldd", *paths[i : i + 200]], capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if m:
                libs.add(m.group(1))
    return libs


def _pyc_for(src: Path) -> bytes:
    """Bytecode for a repository file (cached by path, size and mtime): the outer VM runs
    under an emulator, where compiling at import time is slow."""
    st = src.stat()
    key = hashlib.sha256(f"{src}\0{st.st_size}\0{st.st_mtime_ns}\0{sys.version}".encode()).hexdigest()[:24]
    cached = cache_root() / "pyc" / f"{key}.pyc"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
        py_compile.compile(str(src), cfile=str(tmp), dfile=str(src), doraise=True)
        tmp.rename(cached)
    return cached.read_bytes()


def add_python(archive: Archive) -> str:
    """The venv's interpreter and everything embervm imports; returns the python path."""
    python = _venv_python()
    info = _runtime_files(python)
    archive.add_host_path(python)
    prefix = Path(info["prefix"][0])
    if (prefix / "pyvenv.cfg").is_file():
        archive.add_host_path(prefix / "pyvenv.cfg")
    for script in ("embervm", "embervm-jailer"):
        if (prefix / "bin" / script).is_file():
            archive.add_host_path(prefix / "bin" / script)
    archive.add_host_tree(info["stdlib"][0], skip=STDLIB_SKIP)
    for f in info["files"]:
        if os.path.isfile(f):
            archive.add_host_path(f)
    elves = [info["base_executable"][0], str(python)]
    elves += ["/" + n for n, e in archive.entries.items() if n.endswith(".so") or ".so." in n if e.source is not None]
    for lib in sorted(_ldd(elves)):
        archive.add_host_path(lib)
    for name in EXTRA_LIBS:
        for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64"):
            if os.path.exists(f"{d}/{name}"):
                archive.add_host_path(f"{d}/{name}")
                break
    for tool in ("/sbin/ldconfig", "/etc/ld.so.cache"):
        if os.path.exists(tool):
            archive.add_host_path(tool)
    return str(python)


def add_tools(archive: Archive, names: list[str]) -> None:
    paths = []
    for name in names:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
        if path is None:
            raise EnvironmentError_(f"{name} is not installed")
        paths.append("/" + archive.add_host_path(path))
    for lib in sorted(_ldd(paths)):
        archive.add_host_path(lib)


def add_working_tree(archive: Archive) -> None:
    """embervm's Python files from the working tree (tracked or not), with bytecode."""
    tag = sys.implementation.cache_tag
    for package in REPO_PACKAGES:
        for src in sorted((REPO_ROOT / package).rglob("*.py")):
            if "__pycache__" in src.parts or any(p.startswith(".") for p in src.relative_to(REPO_ROOT).parts):
                continue
            archive.add_host_path(src)
            archive.file(str(src.parent / "__pycache__" / f"{src.stem}.{tag}.pyc"), _pyc_for(src))
    for extra in ("pyproject.toml",):
        archive.add_host_path(REPO_ROOT / extra)
    for path in sorted(GUEST_DIR.iterdir()):
        if path.is_file():
            archive.add_host_path(path)


def outer_initramfs(kernel: KernelFiles, modules: ModuleIndex, inner: Path, rootfs: Path) -> tuple[Path, str]:
    archive = Archive()
    add_base_system(archive)
    modules.add_to(archive, "e2e/modules", OUTER_MODULES)
    python = add_python(archive)
    add_tools(archive, OUTER_TOOLS)
    add_working_tree(archive)
    archive.file("e2e/guest/vmlinux", kernel.vmlinux)
    archive.file("e2e/guest/bzImage", kernel.bzimage)
    archive.file("e2e/guest/initramfs", inner)
    archive.file("e2e/guest/rootfs.ext4", rootfs)
    init = (GUEST_DIR / "outer_init.sh").read_text()
    init = init.replace("@PYTHON@", python).replace("@REPO@", str(REPO_ROOT))
    archive.file("init", init.encode(), 0o755)
    return cached_archive("outer", archive, kernel), python


# --- entry points ---------------------------------------------------------------------------------
def prepare() -> Environment:
    """Everything the nested tests need, built or taken from the cache."""
    ensure_host_packages()
    kernel = debian_kernel()
    if kernel.config is None:
        raise EnvironmentError_(f"the kernel cache for {kernel.version} has no config file")
    with locked():
        modules = ModuleIndex(modules_dir(kernel))
        inner = inner_initramfs(kernel, modules)
        rootfs = rootfs_image(kernel, modules)
        outer, python = outer_initramfs(kernel, modules, inner, rootfs)
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise EnvironmentError_("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return Environment(kernel, outer, inner, rootfs, qemu, python)


def main(argv: list[str] | None = None) -> int:
    """`--host-packages`: only install the Debian packages (scripts/setup --tests); else prepare all."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if args == ["--host-packages"]:
            ensure_host_packages()
            return 0
        env = prepare()
    except EnvironmentError_ as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"kernel  {env.kernel.version}\nbzImage {env.kernel.bzimage}\nvmlinux {env.kernel.vmlinux}")
    print(f"outer   {env.outer_initramfs} ({env.outer_initramfs.stat().st_size >> 20} MiB)")
    print(f"inner   {env.inner_initramfs}\nrootfs  {env.rootfs}\nqemu    {env.qemu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
