#!/usr/bin/env bash
# Host-side helpers shared by run.sh and run2.sh; not a command of its own.
#
#   . deploy/lab/lib.sh
#
# Main entry points:
#   lab_init                      load kernel.env (running setup.sh if needed)
#   lab_write_env STATE K=V...    write STATE/env for guest-init.sh
#   lab_guest NAME STATE LOG MEM CPUS TIMEOUT PREFIX [QEMU_OPTS]
#                                 boot one guest, stream LOG, return the
#                                 command's exit code (124 timeout, 125 lab failure)
#
# Tunables (host environment):
#   ZCMSG_LAB_BOOT_TIMEOUT   seconds until the guest must reach guest-init (240)
#   ZCMSG_LAB_DEVICE_WAIT    seconds the guest waits for rxe0 to be ready (90)
#   ZCMSG_LAB_VERBOSE=1      pass --verbose to vng (kernel console in the log)
#   ZCMSG_LAB_CACHE          setup.sh's cache directory (/var/cache/zcmsg-lab)
#   ZCMSG_LAB_APPEND         more guest kernel parameters (bench.sh sets the
#                            clock source with it)

lab_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
lab_cache=${ZCMSG_LAB_CACHE:-/var/cache/zcmsg-lab}
lab_boot_timeout=${ZCMSG_LAB_BOOT_TIMEOUT:-240}
lab_device_wait=${ZCMSG_LAB_DEVICE_WAIT:-90}
lab_blacklist=kvm,kvm_amd,kvm_intel,ahci,sr_mod,sg,pcspkr,psmouse,serio_raw,evdev,i2c_i801,lpc_ich,iTCO_wdt,intel_pmc_bxt,i6300esb,ccp,qemu_fw_cfg,button
LAB_RC_TIMEOUT=124
LAB_RC_FAILURE=125

lab_msg() { printf '[lab-host %s] %s\n' "$(date +%T)" "$*" >&2; }
lab_die() { lab_msg "error: $*"; exit "$LAB_RC_FAILURE"; }

lab_init() {
    local envfile=$lab_cache/kernel.env
    if [ ! -r "$envfile" ]; then
        lab_msg "no $envfile yet: running deploy/lab/setup.sh"
        "$lab_dir/setup.sh" >&2 || lab_die "setup.sh failed"
    fi
    # shellcheck disable=SC1090
    . "$envfile"
    if [ ! -s "${ZCMSG_LAB_KERNEL:-}" ] || [ ! -x "${ZCMSG_LAB_VNG:-}" ] \
        || [ ! -f "/lib/modules/${ZCMSG_LAB_KVER:-none}/modules.dep" ]; then
        lab_msg "lab install incomplete: running deploy/lab/setup.sh"
        "$lab_dir/setup.sh" >&2 || lab_die "setup.sh failed"
        # shellcheck disable=SC1090
        . "$envfile"
    fi
    command -v timeout >/dev/null || lab_die "timeout(1) missing"
}

# Fresh run directory; it is the guest's read-write mount (vng --rwdir).
lab_mkrun() {
    local base=${ZCMSG_LAB_RUNDIR:-${TMPDIR:-/tmp}}
    mktemp -d "$base/zcmsg-lab.XXXXXX"
}

# lab_write_env STATE NAME=VALUE... : the guest's env file, safely quoted, plus
# the host variables that are worth forwarding (host env does not reach the
# guest otherwise).
lab_write_env() {
    local state=$1 kv name
    shift
    mkdir -p "$state"
    {
        for kv in "$@"; do
            printf '%s=%q\n' "${kv%%=*}" "${kv#*=}"
        done
        printf 'LAB_PATH=%q\n' "$PATH"
        while IFS= read -r name; do
            case $name in
            ZCMSG_LAB*) ;;
            ZCMSG_* | RUST_BACKTRACE | RUST_LOG | RUST_TEST_THREADS | RUST_MIN_STACK | CARGO_TERM_COLOR)
                printf 'export %s=%q\n' "$name" "${!name}"
                ;;
            esac
        done < <(compgen -e)
    } >"$state/env"
}

# lab_guest NAME STATE LOG MEM CPUS TIMEOUT PREFIX [QEMU_OPTS]
# Boots one guest running guest-init.sh on STATE (which must lie inside the
# run directory $LAB_RUN), streams its output to stdout (each line prefixed
# by PREFIX) and appends it to LOG, and returns the guest command's exit
# code, or 124 (a timeout) / 125 (a lab failure) with the reason printed.
# qemu's pid is written to STATE/qemu.pid (run2.sh kills it from there).
lab_guest() {
    local name=$1 state=$2 log=$3 mem=$4 cpus=$5 cmd_timeout=$6 prefix=$7 qopts=${8:-}
    local host_timeout=$((lab_boot_timeout + lab_device_wait + cmd_timeout + 60))
    local -a vng_args=(--disable-kvm --run "$ZCMSG_LAB_KERNEL" --user root
                       --name "$name" --memory "$mem" --cpus "$cpus"
                       --rwdir "$LAB_RUN"
                       "--qemu-opts=-pidfile $state/qemu.pid $qopts"
                       --exec "bash $(printf '%q %q' "$lab_dir/guest-init.sh" "$state")")
    # udev's coldplug would load drivers for every emulated q35 device (kvm,
    # ahci, watchdogs, input, ...), ~20 s of TCG time the lab never uses.
    vng_args+=("--append=modprobe.blacklist=$lab_blacklist${ZCMSG_LAB_APPEND:+ $ZCMSG_LAB_APPEND}")
    [ "${ZCMSG_LAB_VERBOSE:-0}" = 1 ] && vng_args+=(--verbose)

    rm -f "$state"/{booted,ready,rc,reason,qemu.pid,killed,timeout.pid}
    : >>"$log"
    local t0 vpid tpid
    t0=$(date +%s)
    # vng (and the qemu it starts, which reopens /proc/self/fd/1 and 2 with
    # O_TRUNC and offsets of its own) writes into a FIFO, never straight into
    # the log file: one reader appends to LOG and streams to our stdout.
    local fifo=$state/console.fifo
    rm -f "$fifo"
    mkfifo "$fifo"
    if [ -n "$prefix" ]; then
        { tee -a "$log" | sed -u "s/^/$prefix/"; } <"$fifo" &
    else
        tee -a "$log" <"$fifo" &
    fi
    tpid=$!
    # `timeout` puts itself and vng/qemu in a process group of their own and
    # signals the whole group when it expires (or when it is itself killed),
    # so no qemu outlives the run. stdin is /dev/null: vng then needs no TTY.
    timeout --kill-after=20 "$host_timeout" "$ZCMSG_LAB_VNG" "${vng_args[@]}" \
        </dev/null >"$fifo" 2>&1 &
    vpid=$!
    LAB_PIDS+=("$vpid")
    # Also on disk: lab_guest may run in a subshell (run2.sh) whose variables
    # the parent's cleanup cannot see.
    echo "$vpid" >"$state/timeout.pid"
    lab_msg "$name: booting (vng --disable-kvm, ${cpus} cpu, ${mem}); log $log"

    local phase=boot verdict='' now
    while kill -0 "$vpid" 2>/dev/null; do
        now=$(date +%s)
        if [ "$phase" = boot ] && [ -e "$state/booted" ]; then
            lab_msg "$name: booted after $((now - t0))s, setting up rxe0"
            phase=device
        fi
        if [ "$phase" = device ] && [ -e "$state/ready" ]; then
            lab_msg "$name: rxe0 ready after $((now - t0))s, command started"
            phase=run
        fi
        if [ "$phase" = boot ] && [ $((now - t0)) -ge "$lab_boot_timeout" ]; then
            verdict="guest did not boot within ${lab_boot_timeout}s (ZCMSG_LAB_BOOT_TIMEOUT)"
            kill -TERM "$vpid" 2>/dev/null || true
            break
        fi
        sleep 0.5
    done
    local vrc=0
    wait "$vpid" || vrc=$?
    rm -f "$state/timeout.pid"
    wait "$tpid" 2>/dev/null || true
    rm -f "$fifo"

    local rc
    if [ -s "$state/rc" ]; then
        rc=$(cat "$state/rc")
        [ -s "$state/reason" ] && verdict=$(cat "$state/reason")
    elif [ -n "$verdict" ]; then
        rc=$LAB_RC_FAILURE
    elif [ -e "$state/killed" ]; then
        rc=137
        verdict="qemu was killed by the lab (--kill-b-after), as requested"
    elif [ "$vrc" = 124 ] || [ "$vrc" = 137 ]; then
        rc=$LAB_RC_TIMEOUT
        verdict="host-side timeout (${host_timeout}s) hit in phase '$phase'"
    elif [ "$phase" = boot ]; then
        rc=$LAB_RC_FAILURE
        verdict="guest failed to boot (vng exited with $vrc before guest-init ran)"
    else
        rc=$LAB_RC_FAILURE
        verdict="guest stopped without reporting a result in phase '$phase' (vng exit $vrc)"
    fi
    # shellcheck disable=SC2034 # read by the sourcing script
    LAB_VERDICT=$verdict
    local summary="$name: exit $rc after $(( $(date +%s) - t0 ))s${verdict:+ ($verdict)}"
    printf '[lab-host] %s\n' "$summary" >>"$log"
    lab_msg "$summary"
    return "$rc"
}

# Print the last lines of a log, for failures.
lab_tail() {
    local log=$1 n=${2:-60}
    printf '\n----- last %s lines of %s -----\n' "$n" "$log" >&2
    tail -n "$n" "$log" >&2 || true
    printf -- '----- end of %s -----\n' "$log" >&2
}

# Kill whatever this script started and is still running (by pid only).
lab_cleanup() {
    local p f
    for p in "${LAB_PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    if [ -n "${LAB_RUN:-}" ]; then
        for f in "$LAB_RUN"/*/timeout.pid; do
            [ -s "$f" ] || continue
            kill -TERM "$(cat "$f")" 2>/dev/null || true
        done
    fi
}
LAB_PIDS=()
