#!/usr/bin/env bash
# The device tests, run for real inside the Soft-RoCE lab (see deploy/lab/).
# Builds the verbs tests optimized on the host (the guest shares the host's
# root filesystem and runs them unchanged), boots ONE guest, and runs every
# test binary there with --include-ignored, where a missing device fails.
#
#   deploy/lab-tests.sh
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/lab/setup.sh

echo "== building the verbs tests (release) for the guest"
mapfile -t bins < <(cargo test -p zcmsg-verbs --release --no-run 2>&1 \
    | sed -n 's/^ *Executable .*(\(.*\))$/\1/p')
[ ${#bins[@]} -gt 0 ] || { echo "no test binaries were built"; exit 1; }
printf '   %s\n' "${bins[@]}"

# One guest for the whole run: a script runs every binary and stops at the
# first failure. Iteration counts are scaled down (the guest is 10-50x slower
# than the host); every wait keeps its bound.
mkdir -p target/lab
script=target/lab/single.sh
{
    echo 'set -u'
    echo 'export ZCMSG_CONFORMANCE_SCALE=0.1 ZCMSG_CONFORMANCE_TIMEOUT_SECS=60 RUST_BACKTRACE=1'
    echo 'status=0'
    for b in "${bins[@]}"; do
        echo "echo '== guest: $(basename "$b")'"
        echo "$(pwd)/$b --include-ignored --test-threads=1 || status=1"
    done
    echo 'exit $status'
} > "$script"

echo "== Soft-RoCE lab, single guest (rxe0 loopback)"
deploy/lab/run.sh --timeout 1500 --log target/lab/single.log -- sh "$(pwd)/$script"
