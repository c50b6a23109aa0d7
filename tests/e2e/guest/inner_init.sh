#!/bin/sh
# /init of the inner guests (Debian's kernel on embervm, inside the outer VM).
#
# Prints "E2E-INIT uptime=<s>" first thing (the boot benchmark's mark), loads the virtio
# and vsock modules, runs the checks named on the kernel command line and powers off
# with `reboot -f` (reboot=k: a reset through the i8042, which ends embervm with 0).
#
#   e2e.checks=boot,cpus:0-1      checks to run, in order; NAME or NAME:ARGUMENT
#   e2e.root=vda                  mount /dev/vda (ext4) and switch_root to it first
#
# Each check prints one line "E2E-CHECK <name> PASS|FAIL <detail>"; the last line is
# "E2E-DONE failures=<n>". Add a check as a function check_<name> taking the argument.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

mount -t proc proc /proc 2>/dev/null
if [ -e /e2e/rootfs ]; then
    echo "E2E-ROOT uptime=$(cut -d' ' -f1 /proc/uptime) root=$(awk '$2 == "/" {print $1}' /proc/mounts | tail -1)"
else
    echo "E2E-INIT uptime=$(cut -d' ' -f1 /proc/uptime)"
fi
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null

arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}" ;; esac; done; }
failures=0
pass() { echo "E2E-CHECK $1 PASS $2"; }
fail() { echo "E2E-CHECK $1 FAIL $2"; failures=$((failures + 1)); }
finish() {
    echo "E2E-DONE failures=$failures"
    sync
    reboot -f
    sleep 10
    echo "E2E-INIT reboot -f returned"
}

insmod_failed=""
loaded=0
for m in $(cat /lib/e2e-modules/order); do
    grep -q "^$m " /proc/modules && continue
    if insmod "/lib/e2e-modules/$m.ko" 2>/dev/null; then
        loaded=$((loaded + 1))
    else
        insmod_failed="$insmod_failed $m"
    fi
done

wait_for() { # wait_for PATH SECONDS
    i=0
    while [ ! -e "$1" ] && [ "$i" -lt $(($2 * 10)) ]; do sleep 0.1; i=$((i + 1)); done
    [ -e "$1" ]
}

root=$(arg e2e.root)
if [ -n "$root" ] && [ ! -e /e2e/rootfs ]; then
    mkdir -p /newroot
    if wait_for "/dev/$root" 5 && mount -t ext4 "/dev/$root" /newroot; then
        umount /sys /dev 2>/dev/null
        umount /proc
        exec switch_root /newroot /init
    fi
    fail root "cannot mount /dev/$root"
    finish
fi

echo "E2E-INFO kernel $(uname -r)"
echo "E2E-INFO cmdline $(cat /proc/cmdline)"

check_boot() {
    pass boot "kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
}

check_cpus() {
    online=$(cat /sys/devices/system/cpu/online)
    if [ "$online" = "$1" ]; then pass cpus "online=$online"; else fail cpus "online=$online expected=$1"; fi
}

check_modules() {
    if [ -z "$insmod_failed" ]; then pass modules "loaded=$loaded"; else fail modules "insmod failed:$insmod_failed"; fi
}

check_mem() { # the guest's memory in MiB, at least the argument
    total=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    if [ "$total" -ge "${1:-1}" ]; then pass mem "total_mib=$total"; else fail mem "total_mib=$total expected>=$1"; fi
}

check_blk() { # ext4 on virtio-blk: read a file the host put there, write one back
    if [ -e /e2e/rootfs ]; then
        dir=/e2e
    else
        dev=${1:-vda}
        mkdir -p /mnt
        if ! wait_for "/dev/$dev" 5 || ! mount -t ext4 "/dev/$dev" /mnt; then
            fail blk "cannot mount /dev/$dev"
            return
        fi
        dir=/mnt/e2e
    fi
    hello=$(cat "$dir/hello" 2>&1)
    if echo "written by the guest" >"$dir/written-by-guest" && sync; then wrote=yes; else wrote=no; fi
    [ "$dir" = /mnt/e2e ] && umount /mnt
    if [ "$hello" = "hello from the ext4 root image" ] && [ "$wrote" = yes ]; then
        pass blk "read+write dir=$dir"
    else
        fail blk "hello='$hello' wrote=$wrote"
    fi
}

check_net() { # net:<address/prefix>@<peer>: configure eth0, ping the peer (a TAP in the outer VM)
    address=${1%@*}
    peer=${1#*@}
    if ! wait_for /sys/class/net/eth0 5; then
        fail net "no eth0"
        return
    fi
    ip link set lo up
    ip addr add "$address" dev eth0 && ip link set eth0 up
    if ping -c 3 -W 5 "$peer" >/tmp/ping.out 2>&1; then
        pass net "$(grep -o '[0-9]* packets received' /tmp/ping.out) from $peer"
    else
        fail net "ping $peer: $(tail -n 2 /tmp/ping.out | tr '\n' ' ')"
    fi
}

check_mmds() { # mmds:<path>: MMDS V2 over eth0 (after net): a token from PUT /latest/api/token, then GET
    path=${1:-/latest/meta-data/}
    mmds=169.254.169.254
    ip route add "$mmds" dev eth0 2>/dev/null
    if wget -q -O /dev/null "http://$mmds$path" 2>/dev/null; then
        fail mmds "GET without a token was answered"
        return
    fi
    request="PUT /latest/api/token HTTP/1.1\r\nHost: $mmds\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n"
    token=$( (printf "$request"; sleep 2) | nc -w 5 "$mmds" 80 | tail -n 1 | tr -d '\r')
    value=$(wget -q -O - --header "X-metadata-token: $token" "http://$mmds$path" 2>&1)
    got=$?
    if [ -n "$token" ] && [ "$got" -eq 0 ] && [ -n "$value" ]; then
        pass mmds "$value"
    else
        fail mmds "token='$token' value='$value'"
    fi
}

check_vsock_connect() { # vsock_connect:<port>: connect to the host (CID 2), send "ping", expect "pong:ping"
    reply=$(timeout 30 vsock-e2e connect 2 "$1" ping 2>&1)
    if [ "$reply" = "pong:ping" ]; then pass vsock_connect "$reply"; else fail vsock_connect "reply='$reply'"; fi
}

check_vsock_listen() { # vsock_listen:<port>: serve one connection from the host, echoing a line
    got=$(timeout 60 vsock-e2e echo "$1" 2>&1)
    case $got in
    got:*) pass vsock_listen "$got" ;;
    *) fail vsock_listen "'$got'" ;;
    esac
}

check_vsockstream() { # vsockstream:<send>/<receive>: one connection to the host (CID 2 port 5001):
    # send <send> bytes of the pattern, half-close, read the host's pattern until it closes
    send=${1%/*}
    receive=${1#*/}
    got=$(timeout 600 vsock-e2e stream 2 5001 "$send" 2>&1)
    case $got in
    "stream sent=$send received=$receive bad=0") pass vsockstream "$got" ;;
    *) fail vsockstream "'$got'" ;;
    esac
}

check_rng() { # virtio-rng: the hw_random core picked virtio_rng, /dev/hwrng gives bytes
    current=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
    bytes=$(dd if=/dev/hwrng bs=64 count=4 2>/dev/null | wc -c)
    case $current in
    virtio_rng*) [ "$bytes" -eq 256 ] && pass rng "current=$current bytes=$bytes" || fail rng "current=$current bytes=$bytes" ;;
    *) fail rng "current='$current' bytes=$bytes" ;;
    esac
}

mib() { awk -v k="$1:" '$1 == k { print int($2 / 1024) }' /proc/meminfo; }

check_balloon() { # balloon:<MiB>: dirty RAM, let the host inflate by MiB, see it deflate, then allocate
    want=${1:-64}
    total0=$(mib MemTotal)
    avail0=$(mib MemAvailable)
    mkdir -p /mnt/balloon && mount -t tmpfs -o size=90% tmpfs /mnt/balloon
    # touch nearly every free page (32 MiB spare), so whichever pages the balloon takes, the
    # host holds them: their release must show in the host's resident memory
    dd if=/dev/zero of=/mnt/balloon/dirty bs=1M count=$((avail0 - 32)) 2>/dev/null
    rm -f /mnt/balloon/dirty # free again, but the host holds those pages now
    echo "E2E-BALLOON dirtied MemTotal=$total0 MemAvailable=$avail0"
    i=0
    while [ $((total0 - $(mib MemTotal))) -lt $((want - 2)) ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i + 1)); done
    total1=$(mib MemTotal)
    avail1=$(mib MemAvailable)
    echo "E2E-BALLOON inflated MemTotal=$total1 MemAvailable=$avail1"
    if [ $((total0 - total1)) -lt $((want - 2)) ]; then
        fail balloon "MemTotal $total0 -> $total1 MiB: not inflated by $want"
        return
    fi
    i=0
    while [ $((total0 - $(mib MemTotal))) -gt 2 ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i + 1)); done
    total2=$(mib MemTotal)
    if [ $((total0 - total2)) -gt 2 ]; then
        fail balloon "MemTotal $total0 -> $total1 -> $total2 MiB: not deflated"
        return
    fi
    more=$((avail1 + 16)) # more than the guest could have had while inflated
    dd if=/dev/zero of=/mnt/balloon/after bs=1M count=$more 2>/dev/null
    got=$(($(wc -c </mnt/balloon/after) >> 20))
    rm -f /mnt/balloon/after
    umount /mnt/balloon
    detail="MemTotal=$total0->$total1->$total2 MemAvailable=$avail0->$avail1 allocated=${got}MiB"
    [ "$got" -eq "$more" ] && pass balloon "$detail" || fail balloon "$detail (wanted ${more}MiB)"
}

# --- guest-driven I/O measurements (bench/guest_io.py, the TCP floor test) -------------------
# gio_<test> checks run one guest program between "GIO-BEGIN <name>" and "GIO-END <name>"
# markers (the outer side samples the outer KVM's exit counters when it reads them; the
# sleeps let a marker drain through the UART before the program starts), then print
# "GIO-RESULT <name> rc= bytes= secs= irqs= tx_packets= tx_bytes= rx_packets= rx_bytes=
# outsegs= <extra>": the program's wall time from the guest's clock, the virtio interrupts
# (/proc/interrupts), eth0's frame counters (a TSO frame counts once, so tx_bytes/tx_packets
# is the size of the frames the guest hands the device) and TCP OutSegs (MSS-sized segments).
gio_irqs() { awk '/virtio/ { for (i = 2; i <= NF; i++) { if ($i !~ /^[0-9]+$/) break; n += $i } } END { print n + 0 }' /proc/interrupts; }
gio_stat() { cat "/sys/class/net/eth0/statistics/$1" 2>/dev/null || echo 0; }
gio_outsegs() { awk '/^Tcp:/ { if (seen) print $12; seen = 1 }' /proc/net/snmp; }
gio_sample() { echo "$(cut -d' ' -f1 /proc/uptime) $(gio_irqs) $(gio_stat tx_packets) $(gio_stat tx_bytes) $(gio_stat rx_packets) $(gio_stat rx_bytes) $(gio_outsegs)"; }
gio_tcpext() { # the TcpExt counters that moved between the two netstat snapshots
    cat /tmp/gio.netstat0 /tmp/gio.netstat1 | awk '/^TcpExt:/ { n++; if (n % 2) { for (i = 2; i <= NF; i++) k[i] = $i } else if (n == 2) { for (i = 2; i <= NF; i++) a[i] = $i } else if (n == 4) { for (i = 2; i <= NF; i++) if ($i != a[i]) printf "%s=%d ", k[i], $i - a[i] } }'
}
gio_measure() { # gio_measure NAME BYTES COMMAND...: prints GIO-RESULT; the command's output is in /tmp/gio.out
    name=$1 bytes=$2
    shift 2
    echo "GIO-BEGIN $name"
    sleep 0.5
    cat /proc/net/netstat >/tmp/gio.netstat0 2>/dev/null
    before=$(gio_sample)
    "$@" >/tmp/gio.out 2>&1
    rc=$?
    after=$(gio_sample)
    cat /proc/net/netstat >/tmp/gio.netstat1 2>/dev/null
    echo "GIO-END $name"
    sleep 0.5
    case $name in tcp_*) echo "GIO-INFO $name tcpext $(gio_tcpext)" ;; esac
    set -- $before $after
    echo "GIO-RESULT $name rc=$rc bytes=$bytes $(awk -v a="$*" 'BEGIN { split(a, v, " ");
        printf "secs=%.2f irqs=%d tx_packets=%d tx_bytes=%d rx_packets=%d rx_bytes=%d outsegs=%d",
            v[8] - v[1], v[9] - v[2], v[10] - v[3], v[11] - v[4], v[12] - v[5], v[13] - v[6], v[14] - v[7] }')"
    return $rc
}
gio_result() { # the check's PASS/FAIL line from gio_measure's status
    if [ "$2" -eq 0 ]; then pass "$1" "$(tail -n 1 /tmp/gio.out)"; else fail "$1" "rc=$2 $(tail -n 2 /tmp/gio.out | tr '\n' ' ')"; fi
}

check_gio_tcp_tx() { # gio_tcp_tx:<peer>:<port>:<MiB>: send MiB zeros to a sink on the peer (busybox nc)
    set -- $(echo "$1" | tr ':' ' ')
    echo "GIO-INFO eth0 virtio features $(cat /sys/class/net/eth0/device/features 2>/dev/null)"
    gio_measure tcp_tx $(($3 << 20)) sh -c "dd if=/dev/zero bs=65536 count=$(($3 * 16)) 2>/dev/null | nc -w 10 $1 $2"
    gio_result gio_tcp_tx $?
}

check_gio_tcp_rx() { # gio_tcp_rx:<peer>:<port>:<MiB>: fetch MiB from the peer's HTTP source (busybox wget)
    set -- $(echo "$1" | tr ':' ' ')
    gio_measure tcp_rx $(($3 << 20)) wget -q -O /dev/null "http://$1:$2/$(($3 << 20))"
    gio_result gio_tcp_rx $?
}

check_gio_ping() { # gio_ping:<peer>:<count>: adaptive ping (-A: the next one as soon as the reply is in)
    set -- $(echo "$1" | tr ':' ' ')
    gio_measure ping 0 ping -A -q -c "${2:-20}" "$1"
    rc=$?
    echo "GIO-INFO ping $(tail -n 1 /tmp/gio.out)"
    gio_result gio_ping $rc
}

check_gio_blk() { # gio_blk:<dev>: O_DIRECT reads and writes with busybox dd on a scratch disk
    dev=/dev/${1:-vda}
    wait_for "$dev" 5 || { fail gio_blk "no $dev"; return; }
    rc=0
    gio_measure blk_seq_read $((32 << 20)) dd if="$dev" of=/dev/null bs=131072 count=256 iflag=direct || rc=$?
    gio_measure blk_seq_write $((16 << 20)) dd if=/dev/zero of="$dev" bs=131072 count=128 seek=256 oflag=direct || rc=$?
    gio_measure blk_4k_read $((2 << 20)) dd if="$dev" of=/dev/null bs=4096 count=512 skip=1024 iflag=direct || rc=$?
    gio_measure blk_4k_write $((2 << 20)) dd if=/dev/zero of="$dev" bs=4096 count=512 seek=1024 oflag=direct || rc=$?
    gio_result gio_blk $rc
}

check_gio_vsock_tx() { # gio_vsock_tx:<port>:<MiB>: send MiB to the host (CID 2)
    set -- $(echo "$1" | tr ':' ' ')
    gio_measure vsock_tx $(($2 << 20)) vsock-e2e send 2 "$1" $(($2 << 20))
    gio_result gio_vsock_tx $?
}

check_gio_vsock_rx() { # gio_vsock_rx:<port>: accept one connection from the host, read to its end
    gio_measure vsock_rx 0 vsock-e2e sink "$1"
    gio_result gio_vsock_rx $?
}

ping_stats() { # ping_stats FILE INTERVAL: "sent= received= loss_pct= longest_gap_s= max_rtt_ms=" of a busybox
    # ping log; the longest gap is the longest time without a reply (a reply to seq s arrives at
    # s * INTERVAL + its rtt; the output lists them in arrival order), up to the last one sent
    awk -v iv="$2" '
        /bytes from/ { for (i = 1; i <= NF; i++) { if ($i ~ /^seq=/) s = substr($i, 5) + 0; if ($i ~ /^time=/) t = substr($i, 6) + 0 }
                       at = s * iv + t / 1000; if (at - last > gap) gap = at - last; last = at; if (t > rtt) rtt = t }
        / packets transmitted/ { sent = $1; recv = $4 }
        END { if ((sent - 1) * iv - last > gap) gap = (sent - 1) * iv - last
              printf "sent=%d received=%d loss_pct=%.1f longest_gap_s=%.1f max_rtt_ms=%.0f", sent, recv, sent ? 100 * (sent - recv) / sent : 100, gap, rtt }' "$1"
}

mmds_read() { # MMDS V2's /latest/meta-data/e2e with the token $1 is hello-from-mmds
    [ "$(timeout 20 wget -q -O - --header "X-metadata-token: $1" "http://169.254.169.254/latest/meta-data/e2e" 2>&1)" = hello-from-mmds ]
}

mmds_token() { # a V2 session token valid for an hour
    request="PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-metadata-token-ttl-seconds: 3600\r\n\r\n"
    (printf "$request"; sleep 2) | nc -w 5 169.254.169.254 80 | tail -n 1 | tr -d '\r'
}

check_netstress() { # netstress:<peer>:<port>:<seconds> (after net): one TCP stream to the peer's hashing
    # sink (io_peer.py tcp-hash) for <seconds>, while ping runs every 0.2 s and MMDS V2 is read
    # every second with one token taken before; then the stream's bytes and md5, the ping loss and
    # longest gap, the MMDS reads answered and failed, and MMDS once more after the stream
    set -- $(echo "$1" | tr ':' ' ')
    peer=$1 port=$2 secs=${3:-40}
    mmds=169.254.169.254
    ip route add "$mmds" dev eth0 2>/dev/null
    dd if=/dev/urandom of=/tmp/chunk bs=65536 count=4 2>/dev/null # 256 KiB, sent again and again
    token=$(mmds_token)
    rm -f /tmp/ns.done /tmp/ns.mmds /tmp/ns.chunks
    ping -i 0.2 -W 2 "$peer" >/tmp/ns.ping 2>&1 &
    pinger=$!
    (
        # a read in flight when the worker died loses its connection (its TCP state was the
        # worker's, docs/faults.md), and the next read works: that is a retried read, not a failure
        ok=0 failed=0 retried=0
        while [ ! -e /tmp/ns.done ]; do
            if mmds_read "$token"; then
                ok=$((ok + 1))
            elif mmds_read "$token"; then
                retried=$((retried + 1))
            else
                failed=$((failed + 1))
            fi
            echo "$ok $failed $retried" >/tmp/ns.mmds
            sleep 1
        done
    ) &
    reader=$!
    end=$(($(cut -d. -f1 /proc/uptime) + secs))
    (
        n=0
        while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
            cat /tmp/chunk || break
            n=$((n + 1))
            echo $n >/tmp/ns.chunks
        done
    ) | nc -w 30 "$peer" "$port"
    rc=$?
    touch /tmp/ns.done
    wait $reader
    kill -INT $pinger
    wait $pinger
    chunks=$(cat /tmp/ns.chunks 2>/dev/null || echo 0)
    md5=$(i=0; while [ $i -lt "$chunks" ]; do cat /tmp/chunk; i=$((i + 1)); done | md5sum | cut -d' ' -f1)
    after=$(timeout 20 wget -q -O - --header "X-metadata-token: $(mmds_token)" "http://$mmds/latest/meta-data/e2e" 2>&1)
    set -- $(cat /tmp/ns.mmds 2>/dev/null || echo 0 0 0)
    detail="rc=$rc bytes=$((chunks * 262144)) md5=$md5 $(ping_stats /tmp/ns.ping 0.2) mmds_ok=$1 mmds_failed=$2 mmds_retried=$3 mmds_after=$after"
    if [ "$rc" -eq 0 ] && [ "$chunks" -gt 0 ] && [ "$2" -eq 0 ] && [ "$after" = hello-from-mmds ]; then
        pass netstress "$detail"
    else
        fail netstress "$detail"
    fi
}

check_netdead() { # netdead:<peer>:<seconds> (after net): ping the peer once a second while the host
    # delays the net device, then breaks it past its restart policy; then what the guest saw:
    # the record (each ping's round trip in ms, "-" for no answer within 3 s), the device's
    # virtio status byte, the kernel's lines about it, and whether the root disk takes a write
    set -- $(echo "$1" | tr ':' ' ')
    peer=$1 secs=${2:-30}
    end=$(($(cut -d. -f1 /proc/uptime) + secs))
    record=""
    while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
        rtt=$(ping -c 1 -W 3 "$peer" 2>/dev/null | sed -n 's/.*time=\([0-9]*\).*/\1/p')
        record="$record${record:+,}${rtt:--}"
        sleep 1
    done
    dev=$(basename "$(readlink /sys/class/net/eth0/device)")
    status=$(cat "/sys/class/net/eth0/device/status" 2>/dev/null)
    dmesg | grep -iE "virtio_net|virtio$(echo "$dev" | tr -dc 0-9)|eth0|NETDEV|watchdog|reset|timed? ?out" | sed 's/^/E2E-DMESG /'
    if echo "written after the net device broke" >/e2e/after-net-broke && sync; then wrote=yes; else wrote=no; fi
    detail="pings_ms=$record device=$dev status=$status wrote=$wrote"
    [ "$wrote" = yes ] && pass netdead "$detail" || fail netdead "$detail"
}

check_soak() { # soak:<seconds>:<peer>:<port>:<vsock MiB> (after net, root on vda): block, net and vsock
    # traffic at once for <seconds> while the host kills random device workers: blkstress on the
    # root, netstress to the peer, and vsock streams of <MiB> from the host (CID 2 port 5001)
    # one after the other; each prints its own E2E-CHECK line, and soak passes if all three do
    set -- $(echo "$1" | tr ':' ' ')
    secs=$1 peer=$2 port=$3 vmib=$4
    (check_blkstress "$secs") >/tmp/soak.blk 2>&1 &
    (check_netstress "$peer:$port:$secs") >/tmp/soak.net 2>&1 &
    (
        end=$(($(cut -d. -f1 /proc/uptime) + secs))
        n=0 good=0
        while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
            n=$((n + 1))
            got=$(timeout 600 vsock-e2e stream 2 5001 4096 2>&1)
            [ "$got" = "stream sent=4096 received=$((vmib << 20)) bad=0" ] && good=$((good + 1)) || echo "E2E-SOAK vsock stream $n: '$got'"
        done
        detail="streams=$n good=$good bytes=$((good * (vmib << 20)))"
        [ "$n" -gt 0 ] && [ "$good" -eq "$n" ] && pass vsockloop "$detail" || fail vsockloop "$detail"
    ) >/tmp/soak.vsock 2>&1 &
    wait
    cat /tmp/soak.blk /tmp/soak.net /tmp/soak.vsock
    passed=$(cat /tmp/soak.blk /tmp/soak.net /tmp/soak.vsock | grep -c '^E2E-CHECK [a-z]* PASS')
    [ "$passed" -eq 3 ] && pass soak "passed=3" || fail soak "passed=$passed of 3"
}

STRESS_LINES=32 # each stress file holds its own path, once per line, this many times

stress_write() { # stress_write DIR ROUND COUNT: files DIR/r<ROUND>-<i> of known contents
    awk -v d="$1" -v r="$2" -v n="$3" -v lines=$STRESS_LINES \
        'BEGIN { for (i = 1; i <= n; i++) { f = d "/r" r "-" i; for (j = 0; j < lines; j++) print f > f; close(f) } }'
}

stress_bad() { # stress_bad FILE...: how many of the files do not hold exactly their known contents
    awk -v lines=$STRESS_LINES '
        FNR == 1 && NR > 1 && last != lines { bad++ }
        FNR == 1 { seen++ }
        $0 != FILENAME { wrong[FILENAME] = 1 }
        { last = FNR }
        END { if (last != lines) bad++; for (f in wrong) bad++; print bad + 0 }' "$@"
}

check_blkstress() { # blkstress:<seconds>: write files of known contents, fsync, drop the page cache,
    # read them back through the device and check them, round after round, for <seconds>; each
    # round is checked once more before it is removed to make room (the root image holds ~40
    # rounds: at most `keep` stay on disk), and the last `keep` once more at the end; the kernel
    # log must show no I/O error or timeout
    dir=/e2e/stress
    per_round=200
    keep=16
    mkdir -p "$dir"
    end=$(($(cut -d. -f1 /proc/uptime) + ${1:-60}))
    round=0 files=0 bad=0 final=0
    while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
        round=$((round + 1))
        stress_write "$dir" "$round" "$per_round"
        sync
        echo 3 >/proc/sys/vm/drop_caches
        found=$(ls "$dir" | grep -c "^r$round-")
        bad=$((bad + per_round - found + $(stress_bad "$dir/r$round-"*)))
        files=$((files + per_round))
        old=$((round - keep))
        if [ "$old" -ge 1 ]; then
            final=$((final + per_round - $(ls "$dir" | grep -c "^r$old-") + $(stress_bad "$dir/r$old-"*)))
            rm -f "$dir/r$old-"*
        fi
    done
    echo 3 >/proc/sys/vm/drop_caches
    first=1
    [ "$round" -gt "$keep" ] && first=$((round - keep + 1))
    for r in $(seq "$first" "$round"); do
        final=$((final + per_round - $(ls "$dir" | grep -c "^r$r-") + $(stress_bad "$dir/r$r-"*)))
    done
    pattern='I/O error|blk_update_request|timed? ?out|EXT4-fs (error|warning)|Buffer I/O'
    errors=$(dmesg | grep -ciE "$pattern")
    dmesg | grep -iE "$pattern" | sed 's/^/E2E-DMESG /'
    detail="rounds=$round files=$files bad=$bad bad_at_end=$final kernel_errors=$errors"
    if [ "$files" -gt 0 ] && [ "$bad" -eq 0 ] && [ "$final" -eq 0 ] && [ "$errors" -eq 0 ]; then
        pass blkstress "$detail"
    else
        fail blkstress "$detail"
    fi
}

check_snapshot() { # snapshot:<vsock port> (after net, root on vda): the guest the host snapshots,
    # kills and restores in new embervm processes (tests/e2e/snapshot_inside.py). It holds a
    # vsock connection to the host (CID 2), then counts on the console once a second until the
    # host types "E2E-GO <address/prefix>@<peer>" on it, which it does only after a restore.
    # Then, in the restored guest: the same boot id, the uptime and the count going on, the held
    # connection ended by the transport reset, eth0 re-addressed and pinging its peer, MMDS
    # answering (its value names this clone), the root fs taking a write (that value, in
    # /e2e/identity), a new vsock connection (port 5000), and no error in the kernel log since
    port=${1:-5002}
    boot_id=$(cat /proc/sys/kernel/random/boot_id)
    vsock-e2e hold 2 "$port" >/tmp/hold.out 2>&1 &
    holder=$!
    wait_for_line() { i=0; while ! grep -q "$1" /tmp/hold.out && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done; }
    wait_for_line pong
    logged=$(dmesg | wc -l)
    echo "E2E-SNAP looping boot_id=$boot_id hold='$(head -n 1 /tmp/hold.out)' clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
    n=0
    line=""
    reset_at=""
    while :; do
        n=$((n + 1))
        echo "E2E-COUNT $n up=$(cut -d' ' -f1 /proc/uptime)"
        if read -t 1 line; then
            case $line in
            *E2E-GO*) break ;;
            *) echo "E2E-SNAP read '$line'" ;;
            esac
        fi
        # restored, but no GO line within 30 counts of the held connection's end: the serial
        # input is broken; say so and end (rather than count until the host's timeout)
        if [ -z "$reset_at" ] && grep -q closed /tmp/hold.out; then reset_at=$n; fi
        if [ -n "$reset_at" ] && [ $((n - reset_at)) -ge 30 ]; then
            fail snapshot_console "no E2E-GO line on the serial console"
            return
        fi
    done
    echo "E2E-SNAP restored boot_id=$(cat /proc/sys/kernel/random/boot_id) up=$(cut -d' ' -f1 /proc/uptime) count=$n"
    pass snapshot_console "read '$line'"
    line=${line#*E2E-GO }
    wait_for_line closed
    kill "$holder" 2>/dev/null
    hold=$(tail -n 1 /tmp/hold.out)
    [ "$hold" = "closed -104" ] && pass snapshot_held "$hold" || fail snapshot_held "'$hold' (want the reset's -104)"
    ip addr flush dev eth0
    check_net "$line"
    check_mmds /latest/meta-data/e2e
    identity=$(wget -q -O - --header "X-metadata-token: $(mmds_token)" "http://169.254.169.254/latest/meta-data/e2e" 2>&1)
    if echo "$identity" >/e2e/identity && sync; then pass snapshot_write "identity=$identity"; else fail snapshot_write "no write"; fi
    check_vsock_connect 5000
    pattern='error|fail|BUG|WARNING|stall|lockup|timed? ?out|unstable|hung|Call Trace|soft|hard'
    dmesg | tail -n +$((logged + 1)) | sed 's/^/E2E-DMESG /'
    errors=$(dmesg | tail -n +$((logged + 1)) | grep -ciE "$pattern")
    [ "$errors" -eq 0 ] && pass snapshot_dmesg "new_lines=$(($(dmesg | wc -l) - logged))" || fail snapshot_dmesg "errors=$errors"
}

check_dmesg() { # diagnostics: the kernel log, or the lines matching the argument (a regex)
    dmesg | grep -E "${1:-.}" | sed 's/^/E2E-DMESG /'
    pass dmesg "lines=$(dmesg | wc -l)"
}

checks=$(arg e2e.checks)
for spec in $(echo "$checks" | tr ',' ' '); do
    name=${spec%%:*}
    argument=""
    [ "$name" != "$spec" ] && argument=${spec#*:}
    if command -v "check_$name" >/dev/null 2>&1; then
        "check_$name" "$argument"
    else
        fail "$name" "no such check"
    fi
done
finish
