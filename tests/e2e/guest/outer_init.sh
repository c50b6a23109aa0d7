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

# A line a minute (e2e.alive) on the second serial port (the host keeps it apart from the
# console, where it could cut a line of the job's in two): the host tells an outer VM that
# stopped running (stalled) from a job that hung.
alive_s=$(arg e2e.alive)
if [ "${alive_s:-0}" -gt 0 ] && [ -c /dev/ttyS1 ]; then
    ( while sleep "$alive_s"; do
        echo "E2E-OUTER-ALIVE uptime=$(cut -d' ' -f1 /proc/uptime) load=$(cut -d' ' -f1 /proc/loadavg)" >/dev/ttyS1
    done ) &
    alive=$!
fi

# When the job runs out of time, show where it and the kernel are, before it is killed: the
# processes, the blocked tasks' kernel stacks (also sysrq w) and the kernel's last lines.
stuck() {
    echo "E2E-OUTER-STUCK the job ran out of time at uptime=$(cut -d' ' -f1 /proc/uptime)"
    ps -o pid,stat,rss,args
    for d in /proc/[0-9]*; do
        case $(cut -d' ' -f3 "$d/stat" 2>/dev/null) in
        D) echo "--- $d $(cat "$d/comm")"; cat "$d/stack" ;;
        esac
    done
    echo w > /proc/sysrq-trigger 2>/dev/null
    dmesg | tail -n 60
    echo "E2E-OUTER-STUCK end"
}

cd "$E2E_REPO" 2>/dev/null || cd /tmp
if [ -x /e2e/job ]; then
    # the deadline counts from the outer kernel's start; the job gets what the boot left
    left=$(( ${timeout_s:-600} - $(cut -d. -f1 /proc/uptime) ))
    exec 3<&0  # a job in the background keeps the console as its stdin (the demo types there)
    /e2e/job <&3 3<&- &
    job=$!
    ( sleep "$left"; stuck; kill -KILL $job ) &
    watch=$!
    wait $job
    rc=$?
    kill $watch 2>/dev/null
else
    echo "E2E-OUTER no /e2e/job in the initramfs"
    rc=127
fi
[ -n "$alive" ] && kill $alive 2>/dev/null
echo "E2E-OUTER-EXIT $rc"
sync
"$E2E_PYTHON" "$E2E_REPO/tests/e2e/guest/debug_exit.py" "$rc"
echo "E2E-OUTER isa-debug-exit did not end QEMU; powering off"
poweroff -f
