#!/usr/bin/env bash
# Checks that this host can run zcmsg over RDMA, before a benchmark or a
# service finds out the hard way. Reads sysfs and the process limits only
# (no traffic, no root needed), prints one line per check (OK, WARN, FAIL)
# with what to do about a failure, and exits 1 if any check failed.
#
#   deploy/roce-check.sh [--device DEV] [--port N] [--addr IP]
#
#   --device DEV  the RDMA device to check (default: every one found)
#   --port N      its port (default 1)
#   --addr IP     the local IPv4 address connections will use: checks that
#                 the device owns it and that its GID is RoCE v2, and prints
#                 the GID index rdma_cm will pick (zcperf's -x)
#
# Checked: the kernel's RDMA stack (ib_uverbs, rdma_ucm) and its device
# files; each device's port state and link layer; on Ethernet (RoCE) the
# GID table: RoCE v2 entries, the one for --addr, its network device and
# that device's MTU against the port's active MTU; the locked-memory limit
# (registration pins memory: zcmsg's arenas need it unless the process has
# CAP_IPC_LOCK). Wrong GIDs are the most reported RoCE problem: a RoCE v1
# GID, or an address on another device, makes connections fail or hang.
set -uo pipefail

dev_arg='' port=1 addr=''
while [ $# -gt 0 ]; do
    case $1 in
    --device) dev_arg=${2:?--device wants a name}; shift 2 ;;
    --port) port=${2:?--port wants a number}; shift 2 ;;
    --addr) addr=${2:?--addr wants an IPv4 address}; shift 2 ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "roce-check.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done

# Where sysfs and the device files are (tests point these at a made-up tree).
if [ -n "$addr" ] && ! [[ $addr =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}$ ]]; then
    echo "roce-check.sh: --addr wants an IPv4 address (RoCE v2 over IPv4), not '$addr'" >&2
    exit 2
fi
sys=${ZCMSG_SYSFS:-/sys}
devfs=${ZCMSG_DEVFS:-/dev}
failed=0
ok() { printf '  OK    %s\n' "$*"; }
warn() { printf '  WARN  %s\n' "$*"; }
fail() { printf '  FAIL  %s\n' "$*"; failed=1; }

# The GID an IPv4 address maps to, as the kernel writes it in sysfs.
v4_gid() {
    local a b c d
    IFS=. read -r a b c d <<<"$1"
    printf '0000:0000:0000:0000:0000:ffff:%02x%02x:%02x%02x' "$a" "$b" "$c" "$d"
}

echo "== the kernel's RDMA stack"
# Recent kernels load both on first use (libibverbs and librdmacm ask
# for their character devices over netlink, which loads the module), so
# "not loaded" is a warning; a device file present but unusable fails.
uverbs=0
if [ -d "$sys/module/ib_uverbs" ] || [ -d "$sys/class/infiniband_verbs" ]; then
    ok "ib_uverbs loaded (user-space verbs)"
    uverbs=1
else
    warn "ib_uverbs not loaded yet: libibverbs loads it on first use on recent kernels (else: modprobe ib_uverbs)"
fi
cm=$devfs/infiniband/rdma_cm
if [ -e "$cm" ]; then
    if [ -r "$cm" ] && [ -w "$cm" ]; then
        ok "$cm usable (rdma_cm connections)"
    else
        fail "$cm not readable and writable by $(id -un) (rdma-core's udev rules, or the rdma group)"
    fi
elif [ -d "$sys/module/rdma_ucm" ]; then
    fail "rdma_ucm loaded but $cm missing (no udev or devtmpfs?)"
else
    warn "rdma_ucm not loaded yet: librdmacm loads it on first use on recent kernels (else: modprobe rdma_ucm)"
fi

if [ -n "$dev_arg" ]; then
    devs=("$dev_arg")
    [ -d "$sys/class/infiniband/$dev_arg" ] || {
        found=$(ls "$sys/class/infiniband" 2>/dev/null | tr '\n' ' ')
        fail "no RDMA device $dev_arg (found: ${found:-none})"
        devs=()
    }
else
    mapfile -t devs < <(ls "$sys/class/infiniband" 2>/dev/null)
    [ ${#devs[@]} -gt 0 ] || fail "no RDMA device (load the NIC's driver, or for Soft-RoCE: modprobe rdma_rxe; rdma link add rxe0 type rxe netdev IF)"
fi

for dev in "${devs[@]}"; do
    p=$sys/class/infiniband/$dev/ports/$port
    echo "== $dev port $port"
    if [ ! -d "$p" ]; then
        fail "$dev has no port $port"
        continue
    fi
    ud=$(ls -d "$sys/class/infiniband/$dev/device/infiniband_verbs/uverbs"* 2>/dev/null | head -n 1)
    if [ -z "$ud" ]; then
        ud=$(grep -lx "$dev" "$sys"/class/infiniband_verbs/uverbs*/ibdev 2>/dev/null | head -n 1)
        ud=${ud%/ibdev}
    fi
    if [ -n "$ud" ] && [ -r "$devfs/infiniband/${ud##*/}" ] && [ -w "$devfs/infiniband/${ud##*/}" ]; then
        ok "$devfs/infiniband/${ud##*/} usable"
    elif [ "$uverbs" = 1 ]; then
        fail "no usable $devfs/infiniband/uverbs* for $dev (rdma-core's udev rules, or permissions)"
    fi
    state=$(cat "$p/state" 2>/dev/null)
    case $state in
    *ACTIVE*) ok "state $state" ;;
    *) fail "state ${state:-unknown}: the port is not ACTIVE (link down, or the netdev is down)" ;;
    esac
    ll=$(cat "$p/link_layer" 2>/dev/null)
    ok "link layer ${ll:-unknown}"
    [ "$ll" = Ethernet ] || continue

    # The GID table: type and network device of every populated entry.
    v2=0 want=''
    [ -n "$addr" ] && want=$(v4_gid "$addr")
    match_idx='' match_type='' match_ndev=''
    # Builtin reads only: a GID table has up to thousands of entries (rxe:
    # 1024), and a fork each would take minutes on a slow machine.
    for g in "$p"/gids/*; do
        i=${g##*/}
        read -r gid <"$g" 2>/dev/null || continue
        case $gid in 0000:0000:0000:0000:0000:0000:0000:0000 | fe80:0000:0000:0000:0000:0000:0000:0000) continue ;; esac
        type='' ndev=''
        read -r type <"$p/gid_attrs/types/$i" 2>/dev/null
        read -r ndev <"$p/gid_attrs/ndevs/$i" 2>/dev/null
        [ "$type" = "RoCE v2" ] && v2=$((v2 + 1))
        if [ -n "$want" ] && [ "$gid" = "$want" ]; then
            if [ -z "$match_idx" ] || [ "$type" = "RoCE v2" ]; then
                match_idx=$i match_type=$type match_ndev=$ndev
            fi
        fi
    done
    if [ "$v2" -gt 0 ]; then
        ok "$v2 RoCE v2 GID entries"
    else
        fail "no RoCE v2 GID: only RoCE v1 (or none); an IP address on the netdev adds one"
    fi
    if [ -n "$addr" ]; then
        if [ -z "$match_idx" ]; then
            fail "no GID for $addr on $dev: the address is not on this device's netdev (rdma_cm would pick another device, or none)"
        elif [ "$match_type" != "RoCE v2" ]; then
            fail "$addr is GID index $match_idx, type $match_type, not RoCE v2"
        else
            ok "$addr is GID index $match_idx, RoCE v2, on $match_ndev (zcperf -x $match_idx)"
            mtu=$(cat "$sys/class/net/$match_ndev/mtu" 2>/dev/null)
            amtu=$(ibv_devinfo -d "$dev" -i "$port" 2>/dev/null | awk '/active_mtu/ { print $2 }')
            if [ -n "$mtu" ] && [ -n "$amtu" ]; then
                if [ "$mtu" -ge "$amtu" ]; then
                    ok "$match_ndev MTU $mtu holds the port's active MTU $amtu"
                else
                    warn "$match_ndev MTU $mtu below the port's active MTU $amtu: RoCE packets may not fit"
                fi
            else
                warn "MTU not compared (netdev MTU ${mtu:-?}, active MTU ${amtu:-? (ibv_devinfo missing)})"
            fi
        fi
    fi
done

echo "== process limits"
lim=$(ulimit -l)
if [ "$lim" = unlimited ]; then
    ok "locked memory: unlimited"
elif grep -q '^CapEff:' /proc/self/status \
    && [ $(( 0x$(awk '/^CapEff:/ { print $2 }' /proc/self/status) >> 14 & 1 )) = 1 ]; then
    ok "locked memory limit ${lim} KiB, but CAP_IPC_LOCK lifts it"
elif [ "$lim" -ge $((1024 * 1024)) ]; then
    ok "locked memory limit ${lim} KiB"
else
    warn "locked memory limit ${lim} KiB: registration pins every arena (raise it: ulimit -l, /etc/security/limits.conf memlock, or LimitMEMLOCK= in a systemd unit)"
fi

if [ "$failed" = 0 ]; then
    echo "roce-check: ready"
else
    echo "roce-check: NOT ready (see FAIL above)"
fi
exit "$failed"
