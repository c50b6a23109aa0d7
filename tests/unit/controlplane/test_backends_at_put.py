"""Backends are opened when the API configures them, as Firecracker opens them at PUT time.

PUT /network-interfaces attaches the TAP (TUNSETIFF), PUT /vsock binds uds_path, PUT /drives
opens the backing file and InstanceStart uses that fd; what is replaced or never used is
closed. The harness runs in a network namespace of its own (tests.support.netns.private), so
the TAPs attached (and, as root, created) here never reach the host's.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.support.api_client import assert_no_content, fault

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and tun")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def iface(iface_id: str, tap: str) -> dict[str, str]:
    return {"iface_id": iface_id, "host_dev_name": tap}


def tap_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def test_an_invalid_tap_name_is_refused_at_put_with_firecrackers_message(api):
    assert fault(api.client.put("/network-interfaces/eth0", json=iface("eth0", "t" * 16))) == (
        "Network config error: Could not create the network device: Open tap device failed: Invalid interface name"
    )
    assert api.client.get("/vm/config").json()["network-interfaces"] == []


@needs_root
def test_a_missing_tap_is_created_at_put_as_firecracker_does_as_root(api):
    assert not tap_exists("embertap0")
    assert_no_content(api.client.put("/network-interfaces/eth0", json=iface("eth0", "embertap0")))
    assert tap_exists("embertap0")  # the kernel made it, and its fd is held from PUT on
    # Replacing the interface closes its TAP (a TAP nobody made persistent then goes away).
    assert_no_content(api.client.put("/network-interfaces/eth0", json=iface("eth0", "embertap1")))
    assert tap_exists("embertap1") and not tap_exists("embertap0")


@needs_root
def test_a_tap_held_by_another_interface_fails_its_put_not_instancestart(api):
    assert_no_content(api.client.put("/network-interfaces/eth0", json=iface("eth0", "embertap0")))
    assert "Device or resource busy (os error 16). Invalid TUN/TAP Backend provided by embertap0" in fault(
        api.client.put("/network-interfaces/eth1", json=iface("eth1", "embertap0"))
    )
    # The same interface may be given its own TAP again (the old fd is closed first).
    assert_no_content(api.client.put("/network-interfaces/eth0", json=iface("eth0", "embertap0")))


def test_vsock_uds_path_is_bound_at_put(api, tmp_path: Path):
    path = tmp_path / "v.sock"
    assert_no_content(api.client.put("/vsock", json={"guest_cid": 3, "uds_path": str(path)}))
    assert path.is_socket()
    # Firecracker removes the old socket before binding the new one: the same path works again.
    assert_no_content(api.client.put("/vsock", json={"guest_cid": 4, "uds_path": str(path)}))
    other = tmp_path / "w.sock"
    assert_no_content(api.client.put("/vsock", json={"guest_cid": 4, "uds_path": str(other)}))
    assert other.is_socket() and not path.exists()


@pytest.mark.parametrize(
    ("where", "error"),
    [("missing/v.sock", "No such file or directory (os error 2)"), ("exists", "Address already in use (os error 98)")],
)
def test_a_vsock_path_that_cannot_be_bound_fails_at_put(api, tmp_path: Path, where: str, error: str):
    (tmp_path / "exists").write_bytes(b"")
    assert fault(api.client.put("/vsock", json={"guest_cid": 3, "uds_path": str(tmp_path / where)})) == (
        "Vsock config error: Cannot create backend for vsock device: Error binding to the host-side Unix socket: "
        + error
    )
    assert api.client.get("/vm/config").json()["vsock"] is None


def test_instancestart_uses_the_drive_file_opened_at_put(api, files, tmp_path: Path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"A" * 512)
    put_inode = disk.stat().st_ino
    assert_no_content(api.client.put("/boot-source", json={"kernel_image_path": files["vmlinux"]}))
    drive = {"drive_id": "rootfs", "path_on_host": str(disk), "is_root_device": True, "is_read_only": False}
    assert_no_content(api.client.put("/drives/rootfs", json=drive))
    swapped = tmp_path / "swapped.img"
    swapped.write_bytes(b"B" * 512)
    swapped.rename(disk)  # another file now has the drive's path
    assert disk.stat().st_ino != put_inode
    assert_no_content(api.client.put("/actions", json={"action_type": "InstanceStart"}))
    assert api.vm.backend_inodes["block:rootfs"] == put_inode


def test_patch_drive_opens_the_new_file_at_patch_time(api, files, tmp_path: Path):
    assert_no_content(api.client.put("/boot-source", json={"kernel_image_path": files["vmlinux"]}))
    drive = {"drive_id": "scratch", "path_on_host": files["scratch"], "is_root_device": False, "is_read_only": False}
    assert_no_content(api.client.put("/drives/scratch", json=drive))
    assert_no_content(api.client.put("/actions", json={"action_type": "InstanceStart"}))
    missing = str(tmp_path / "gone.img")
    assert fault(api.client.patch("/drives/scratch", json={"drive_id": "scratch", "path_on_host": missing})) == (
        "Drive config error: Unable to patch the block device: Device manager error: Virtio backend error: Error "
        f"manipulating the backing file: No such file or directory (os error 2) {missing} Please verify the request "
        "arguments."
    )


@needs_root
def test_backends_replaced_or_never_used_are_closed(api, files, tmp_path: Path):
    assert api.client.get("/").status_code == 200  # the client's connection is open from here on
    before = open_fds()
    for image in ("rootfs", "scratch", "rootfs"):
        drive = {"drive_id": "rootfs", "path_on_host": files[image], "is_root_device": True, "is_read_only": False}
        assert_no_content(api.client.put("/drives/rootfs", json=drive))
    for tap in ("embertap0", "embertap1"):
        assert_no_content(api.client.put("/network-interfaces/eth0", json=iface("eth0", tap)))
    for cid in (3, 4):
        assert_no_content(api.client.put("/vsock", json={"guest_cid": cid, "uds_path": str(tmp_path / "v.sock")}))
    assert open_fds() == before + 3  # one drive file, one TAP, one socket: the replaced ones are closed
    api.vmm.close_backends()  # the process ends without InstanceStart
    assert open_fds() == before
    assert not (tmp_path / "v.sock").exists()


@needs_root
def test_instancestart_releases_the_fds_opened_at_put(api, files, tmp_path: Path):
    assert api.client.get("/").status_code == 200
    before = open_fds()
    assert_no_content(api.client.put("/boot-source", json={"kernel_image_path": files["vmlinux"]}))
    drive = {"drive_id": "rootfs", "path_on_host": files["rootfs"], "is_root_device": True, "is_read_only": False}
    assert_no_content(api.client.put("/drives/rootfs", json=drive))
    assert_no_content(api.client.put("/network-interfaces/eth0", json=iface("eth0", "embertap0")))
    assert_no_content(api.client.put("/vsock", json={"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")}))
    assert open_fds() == before + 3
    assert_no_content(api.client.put("/actions", json={"action_type": "InstanceStart"}))
    assert set(api.vm.backend_inodes) == {"block:rootfs", "net:eth0", "vsock:vsock"}
    assert open_fds() == before  # the planners took duplicates; the fake microVM keeps none
    assert (tmp_path / "v.sock").is_socket()  # the running microVM's now: it removes it when it ends


def test_patch_drive_hands_over_the_file_it_opened(api, files, tmp_path: Path):
    assert_no_content(api.client.put("/boot-source", json={"kernel_image_path": files["vmlinux"]}))
    drive = {"drive_id": "scratch", "path_on_host": files["scratch"], "is_root_device": False, "is_read_only": False}
    assert_no_content(api.client.put("/drives/scratch", json=drive))
    assert_no_content(api.client.put("/actions", json={"action_type": "InstanceStart"}))
    new = tmp_path / "new.img"
    new.write_bytes(b"\0" * 512)
    before = open_fds()
    assert_no_content(api.client.patch("/drives/scratch", json={"drive_id": "scratch", "path_on_host": str(new)}))
    assert api.vm.patched_inodes == [new.stat().st_ino]  # one open, at PATCH time, and that fd is used
    assert open_fds() == before  # the microVM owns it now (the fake closed it)


@needs_root
def test_an_unprivileged_embervm_gets_the_kernels_error_for_a_missing_tap(tmp_path: Path):
    """Under the jailer the TAP is made in advance: embervm (not root) cannot create one. As
    there, /dev/net/tun is a node the jail's uid owns (in a mount namespace of the child's own)."""
    import stat

    from devices.net.tap import TapError, open_tap
    from jailer import jail

    node = tmp_path / "tun"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        message = b"opened"
        try:
            jail.unshare(jail.CLONE_NEWNS | jail.CLONE_NEWNET)  # the child exits: no way back needed
            jail.mount("none", "/", None, jail.MS_REC | jail.MS_PRIVATE)
            os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(10, 200))
            os.chown(node, 65534, 65534)
            jail.mount(str(node), "/dev/net/tun", None, jail.MS_BIND)
            os.setgid(65534)
            os.setuid(65534)  # no capabilities left
            try:
                os.close(open_tap("embernopriv0"))
            except TapError as err:
                message = str(err).encode()
        except BaseException as err:
            message = repr(err).encode()
        finally:
            os.write(write, message)
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    assert message == (
        "Open tap device failed: Error while creating ifreq structure: Operation not permitted (os error 1). "
        "Invalid TUN/TAP Backend provided by embernopriv0. Check our documentation on setting up the network devices."
    )
