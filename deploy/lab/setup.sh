#!/usr/bin/env bash
# Installs everything the Soft-RoCE lab needs on a Debian 12 host, then prints
# the guest kernel it will boot. Idempotent; a second run takes about a second.
#
#   deploy/lab/setup.sh
#
# What it sets up:
#   - Debian packages: QEMU, rdma-core and the verbs/rdma_cm tools, perftest,
#     iproute2, kmod, busybox, cpio, ucx-utils, ping (only the missing ones).
#   - virtme-ng from PyPI (command `vng`) when `vng` is not on PATH.
#   - The guest kernel: the linux-image-<ver>-amd64 package that Debian's
#     linux-image-amd64 currently depends on, downloaded (not installed) into
#     the cache directory; its modules are copied to /lib/modules/<ver> (the
#     guest loads modules from the host's root filesystem) and depmod is run.
#   - $ZCMSG_LAB_CACHE/kernel.env (default /var/cache/zcmsg-lab/kernel.env):
#       ZCMSG_LAB_KVER=<ver>  ZCMSG_LAB_KERNEL=<path to vmlinuz>  ZCMSG_LAB_VNG=<path>
#     run.sh, run2.sh and smoke.sh source it.
#
# Needs root (or sudo) and access to Debian's package mirrors and PyPI.
set -euo pipefail

cache=${ZCMSG_LAB_CACHE:-/var/cache/zcmsg-lab}
envfile=$cache/kernel.env

pkgs=(qemu-system-x86 rdma-core ibverbs-providers ibverbs-utils librdmacm1
      rdmacm-utils perftest iproute2 kmod busybox-static cpio ucx-utils
      util-linux procps iputils-ping)

say() { printf 'lab-setup: %s\n' "$*"; }
die() { printf 'lab-setup: error: %s\n' "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=0
apt_update() {
    if [ "$apt_updated" = 0 ]; then
        say "apt-get update"
        as_root apt-get -o DPkg::Lock::Timeout=600 update -qq
        apt_updated=1
    fi
}

# ---------------------------------------------------------------- packages
missing=()
while read -r name status; do
    [ "$status" = installed ] || missing+=("$name")
done < <(for p in "${pkgs[@]}"; do
             s=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
             printf '%s %s\n' "$p" "${s:-none}"
         done)
if [ ${#missing[@]} -gt 0 ]; then
    apt_update
    say "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
        install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---------------------------------------------------------------- virtme-ng
find_vng() {
    command -v vng 2>/dev/null && return 0
    local d
    for d in "$HOME/.local/bin" /usr/local/bin; do
        [ -x "$d/vng" ] && { echo "$d/vng"; return 0; }
    done
    return 1
}
if ! vng=$(find_vng); then
    say "pip install virtme-ng"
    py=python3
    if ! "$py" -m pip --version >/dev/null 2>&1; then
        apt_update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
            install -y -qq --no-install-recommends python3-pip >/dev/null
    fi
    # Debian's own python3 refuses system-wide pip installs (PEP 668); a
    # pyenv or venv python accepts the plain form.
    if ! "$py" -m pip install -q virtme-ng 2>/tmp/zcmsg-lab-pip.err; then
        if grep -q externally-managed /tmp/zcmsg-lab-pip.err; then
            "$py" -m pip install -q --break-system-packages virtme-ng
        else
            cat /tmp/zcmsg-lab-pip.err >&2
            die "pip install virtme-ng failed"
        fi
    fi
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash 2>/dev/null || true; fi
    hash -r
    vng=$(find_vng) || die "virtme-ng installed but no vng on PATH"
fi

# ---------------------------------------------------------------- kernel
# Which linux-image-<ver>-amd64 does linux-image-amd64 depend on? apt-cache
# costs over a second on machines without apt's binary cache, so the answer is
# kept in kernel.env together with a fingerprint of the package lists, and is
# only looked up again when the lists change (after an apt-get update).
lists_fingerprint() {
    # Package lists of any compression; sizes and mtimes, no hashing.
    stat -c '%n %s %Y' /var/lib/apt/lists/*_Packages* 2>/dev/null | cksum | cut -d' ' -f1
}
resolve_kernel_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1
}

fp=$(lists_fingerprint)
kver='' kernel='' old_fp=''
if [ -r "$envfile" ]; then
    # shellcheck disable=SC1090
    . "$envfile"
    kver=${ZCMSG_LAB_KVER:-} kernel=${ZCMSG_LAB_KERNEL:-} old_fp=${ZCMSG_LAB_LISTS:-}
fi

kpkg=''
if [ -z "$kver" ] || [ "$fp" != "$old_fp" ]; then
    kpkg=$(resolve_kernel_pkg)
    if [ -z "$kpkg" ]; then
        apt_update
        fp=$(lists_fingerprint)
        kpkg=$(resolve_kernel_pkg)
    fi
    [ -n "$kpkg" ] || die "cannot resolve the package linux-image-amd64 depends on"
    kver=${kpkg#linux-image-}
fi

modules_ok() {
    [ -f "/lib/modules/$kver/modules.dep" ] \
        && [ -f "$cache/modules-$kver.done" ] \
        && find "/lib/modules/$kver/kernel/drivers/infiniband/sw/rxe" -name 'rdma_rxe.ko*' 2>/dev/null | grep -q .
}

kernel=$cache/vmlinuz-$kver
if [ ! -s "$kernel" ] || ! modules_ok; then
    kpkg=linux-image-$kver
    as_root mkdir -p "$cache/deb"
    deb=$(find "$cache/deb" -maxdepth 1 -name "${kpkg}_*_amd64.deb" | sort | tail -n1)
    if [ -z "$deb" ]; then
        say "downloading $kpkg (about 70 MB)"
        (cd "$cache/deb" && as_root apt-get download -q -o APT::Sandbox::User=root "$kpkg") || {
            apt_update
            (cd "$cache/deb" && as_root apt-get download -q -o APT::Sandbox::User=root "$kpkg")
        }
        deb=$(find "$cache/deb" -maxdepth 1 -name "${kpkg}_*_amd64.deb" | sort | tail -n1)
        [ -n "$deb" ] || die "apt-get download $kpkg produced no .deb"
    fi
    x=$cache/extract-$kver
    as_root rm -rf "$x"
    say "unpacking $(basename "$deb")"
    as_root dpkg -x "$deb" "$x"
    [ -f "$x/boot/vmlinuz-$kver" ] || die "no boot/vmlinuz-$kver in $deb"
    [ -d "$x/lib/modules/$kver" ] || die "no lib/modules/$kver in $deb"
    as_root cp "$x/boot/vmlinuz-$kver" "$kernel.tmp"
    as_root chmod 644 "$kernel.tmp"
    as_root mv "$kernel.tmp" "$kernel"
    as_root rm -f "$cache/modules-$kver.done"
    as_root mkdir -p /lib/modules
    as_root rm -rf "/lib/modules/$kver"
    as_root cp -a "$x/lib/modules/$kver" "/lib/modules/$kver"
    say "depmod $kver"
    as_root depmod "$kver"
    as_root touch "$cache/modules-$kver.done"
    as_root rm -rf "$x"
    # Older kernels' leftovers in the cache are no longer needed.
    find "$cache/deb" -maxdepth 1 -name 'linux-image-*.deb' ! -name "${kpkg}_*" -delete 2>/dev/null || true
fi

tmp=$(mktemp)
{
    printf '# Written by deploy/lab/setup.sh; sourced by the other lab scripts.\n'
    printf 'ZCMSG_LAB_KVER=%q\n' "$kver"
    printf 'ZCMSG_LAB_KERNEL=%q\n' "$kernel"
    printf 'ZCMSG_LAB_VNG=%q\n' "$vng"
    printf 'ZCMSG_LAB_LISTS=%q\n' "$fp"
} >"$tmp"
if ! cmp -s "$tmp" "$envfile" 2>/dev/null; then
    as_root mkdir -p "$cache"
    as_root cp "$tmp" "$envfile"
    as_root chmod 644 "$envfile"
fi
rm -f "$tmp"

say "guest kernel $kver"
say "vmlinuz $kernel"
say "env file $envfile"
