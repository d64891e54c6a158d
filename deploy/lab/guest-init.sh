#!/usr/bin/env bash
# Runs INSIDE a lab guest (started by run.sh or run2.sh through vng --exec);
# never run it on the host.
#
#   bash guest-init.sh STATE_DIR
#
# STATE_DIR is a host directory shared read-write with the guest (vng --rwdir).
# The host writes into it:
#   env   shell assignments: ZCMSG_LAB_MODE (single|pair), ZCMSG_LAB_ROLE,
#         ZCMSG_LAB_ADDR, ZCMSG_LAB_PEER, ZCMSG_LAB_MAC (pair: our NIC's MAC),
#         ZCMSG_LAB_LOSS, ZCMSG_LAB_SHARED, LAB_TIMEOUT, LAB_CWD, LAB_PATH,
#         LAB_DEVICE_WAIT, and the forwarded host variables.
#   cmd   the command, run with bash under `timeout LAB_TIMEOUT`.
# The guest writes back (each file appears once its step is done):
#   booted   the guest reached this script     (content: guest uptime)
#   ready    rxe0 is up, the command starts    (content: guest uptime)
#   rc       the command's exit code, or 124 on timeout, 125 on a lab failure
#   reason   one line, present when the lab (not the command) failed or timed out
set -euo pipefail

state=${1:?usage: guest-init.sh STATE_DIR}
# shellcheck disable=SC1091
. "$state/env"

up() { cut -d' ' -f1 /proc/uptime; }
log() { printf '[lab %s %s] %s\n' "${ZCMSG_LAB_ROLE:-guest}" "$(up)" "$*"; }
put() { printf '%s\n' "$2" >"$state/$1.tmp" && mv -f "$state/$1.tmp" "$state/$1"; }
fail() {
    log "LAB FAILURE: $*"
    put reason "$*"
    dmesg 2>/dev/null | grep -iE 'rxe|rdma|infiniband|virtio_net|error' | tail -n 20 || true
    put rc 125
    exit 125
}

put booted "$(up)"
export PATH=$LAB_PATH
export HOME=${HOME:-/root}
dev=rxe0
log "booted, kernel $(uname -r)"

# ------------------------------------------------------------ network + rxe
case ${ZCMSG_LAB_MODE:?} in
single)
    modprobe rdma_rxe || fail "modprobe rdma_rxe failed"
    ip link add veth0 type veth peer name veth1 || fail "cannot create veth0/veth1"
    ip addr add "$ZCMSG_LAB_ADDR/24" dev veth0
    ip link set lo up
    ip link set veth0 up
    ip link set veth1 up
    nic=veth0
    ;;
pair)
    modprobe virtio_net || true
    modprobe rdma_rxe || fail "modprobe rdma_rxe failed"
    nic=''
    for _ in $(seq 1 50); do
        for d in /sys/class/net/*; do
            if [ "$(cat "$d/address" 2>/dev/null)" = "$ZCMSG_LAB_MAC" ]; then
                nic=${d##*/}
            fi
        done
        [ -n "$nic" ] && break
        sleep 0.2
    done
    [ -n "$nic" ] || fail "no NIC with MAC $ZCMSG_LAB_MAC (virtio-net missing?)"
    ip link set lo up
    ip addr add "$ZCMSG_LAB_ADDR/24" dev "$nic"
    ip link set "$nic" up
    if [ -n "${ZCMSG_LAB_LOSS:-}" ] && [ "$ZCMSG_LAB_LOSS" != 0 ]; then
        tc qdisc add dev "$nic" root netem loss "$ZCMSG_LAB_LOSS%" \
            || fail "tc netem loss $ZCMSG_LAB_LOSS% on $nic failed"
        log "netem: dropping $ZCMSG_LAB_LOSS% of packets leaving $nic"
    fi
    ;;
*)
    fail "unknown ZCMSG_LAB_MODE '$ZCMSG_LAB_MODE'"
    ;;
esac

rdma link add "$dev" type rxe netdev "$nic" || fail "rdma link add $dev type rxe netdev $nic failed"

# rxe0 must be listed by libibverbs, its port ACTIVE, and its RoCEv2 IPv4 GID
# (::ffff:<our address>) present; all bounded by LAB_DEVICE_WAIT seconds.
IFS=. read -r o1 o2 o3 o4 <<<"$ZCMSG_LAB_ADDR"
want_gid=$(printf '0000:0000:0000:0000:0000:ffff:%02x%02x:%02x%02x' "$o1" "$o2" "$o3" "$o4")
gid_index=''
deadline=$(( $(date +%s) + ${LAB_DEVICE_WAIT:-60} ))
while :; do
    if ibv_devices 2>/dev/null | grep -qw "$dev" \
        && ibv_devinfo -d "$dev" 2>/dev/null | grep -q 'PORT_ACTIVE'; then
        for g in /sys/class/infiniband/"$dev"/ports/1/gids/*; do
            if [ "$(cat "$g" 2>/dev/null)" = "$want_gid" ]; then
                t=/sys/class/infiniband/$dev/ports/1/gid_attrs/types/${g##*/}
                if grep -q 'v2' "$t" 2>/dev/null; then gid_index=${g##*/}; break; fi
            fi
        done
        [ -n "$gid_index" ] && break
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
        ibv_devices 2>&1 || true
        ibv_devinfo -d "$dev" 2>&1 | head -n 20 || true
        fail "$dev did not become ready (listed, PORT_ACTIVE, RoCEv2 GID for $ZCMSG_LAB_ADDR) within ${LAB_DEVICE_WAIT:-60}s"
    fi
    sleep 0.5
done
log "$dev ready on $nic ($ZCMSG_LAB_ADDR), RoCEv2 IPv4 GID index $gid_index"

# ------------------------------------------------------------ environment
export ZCMSG_LAB=1
export ZCMSG_LAB_DEVICE=$dev
export ZCMSG_LAB_ADDR
export ZCMSG_LAB_GID_INDEX=$gid_index
export ZCMSG_LAB_NETDEV=$nic
export ZCMSG_LAB_SHARED
if [ "$ZCMSG_LAB_MODE" = pair ]; then
    export ZCMSG_LAB_ROLE ZCMSG_LAB_PEER
else
    unset ZCMSG_LAB_ROLE ZCMSG_LAB_PEER
fi
unset ZCMSG_LAB_MODE ZCMSG_LAB_MAC ZCMSG_LAB_LOSS

if ! ulimit -l unlimited 2>/dev/null; then
    log "note: ulimit -l unlimited refused; memlock limit is $(ulimit -l) KiB"
fi

cd "$LAB_CWD" || fail "cannot cd to $LAB_CWD in the guest"

# ------------------------------------------------------------ the command
put ready "$(up)"
log "running command (timeout ${LAB_TIMEOUT}s) in $LAB_CWD"
start=$(date +%s)
set +e
timeout --kill-after=10 "$LAB_TIMEOUT" bash "$state/cmd" </dev/null
rc=$?
set -e
elapsed=$(( $(date +%s) - start ))
if { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && [ "$elapsed" -ge "$LAB_TIMEOUT" ]; then
    put reason "command timed out after ${LAB_TIMEOUT}s (guest-side timeout)"
    log "command TIMED OUT after ${elapsed}s"
    rc=124
else
    log "command exited with $rc after ${elapsed}s"
fi
put rc "$rc"
exit "$rc"
