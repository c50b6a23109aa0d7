#!/bin/sh
# /init of the outer VM (QEMU, software CPU with SVM): mount the basics, load the KVM
# modules, run /e2e/job (put there by the host for each run), report its exit status on
# the console and through QEMU's isa-debug-exit device, and power off.
# tests/e2e/environment.py substitutes @PYTHON@ and @REPO@.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp PYTHONDONTWRITEBYTECODE=1 E2E_PYTHON=@PYTHON@ E2E_REPO=@REPO@

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
ip link set lo up 2>/dev/null

for m in $(cat /e2e/modules/order); do
    case $m in
    kvm_amd) grep -qw svm /proc/cpuinfo && insmod "/e2e/modules/$m.ko" ;;
    kvm_intel) grep -qw vmx /proc/cpuinfo && insmod "/e2e/modules/$m.ko" ;;
    *) insmod "/e2e/modules/$m.ko" || echo "E2E-OUTER insmod $m failed" ;;
    esac
done

arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}" ;; esac; done; }
timeout_s=$(arg e2e.timeout)
echo "E2E-OUTER-READY uptime=$(cut -d' ' -f1 /proc/uptime) kvm=$([ -c /dev/kvm ] && echo yes || echo no)"

cd "$E2E_REPO" 2>/dev/null || cd /tmp
if [ -x /e2e/job ]; then
    timeout -s KILL "${timeout_s:-600}" /e2e/job
    rc=$?
else
    echo "E2E-OUTER no /e2e/job in the initramfs"
    rc=127
fi
echo "E2E-OUTER-EXIT $rc"
sync
"$E2E_PYTHON" "$E2E_REPO/tests/e2e/guest/debug_exit.py" "$rc"
echo "E2E-OUTER isa-debug-exit did not end QEMU; powering off"
poweroff -f
