#!/usr/bin/env bash
# Prepare this machine and the repo's .venv for pymap. Idempotent and quick when
# everything is already in place (it runs before every `make test`).
set -euo pipefail

say() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }
# Run a command, prefixing everything it prints.
# (pip's "Location ... is ignored" lines come from this machine's pip config, not from us.)
run() {
    "$@" 2>&1 | { grep --line-buffered -v "^WARNING: Location 'file:" || true; } | sed -u 's/^/setup:   /'
}

[[ $(id -u) -eq 0 ]] || die "must run as root (bpf, mounts and apt need it); try: sudo $0"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

# --- Debian packages -----------------------------------------------------------------
# bcc comes from Debian (python3-bpfcc, libbpfcc); PyPI's `bcc` is an unrelated project.
# The second line is what the tests run for real on loopback (receivers, brokers,
# scrapers) and what the hardening uses (libseccomp's binding, strace for audits,
# systemd-analyze to verify the example unit), tmux (the `pymap top` tests drive it).
packages=(python3-bpfcc libbpfcc bpftool linux-headers-amd64 python3-venv
          rsyslog rsyslog-gnutls nats-server prometheus python3-seccomp strace openssl
          systemd tmux)
missing=()
for p in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [[ $status == installed ]] || missing+=("$p")
done
apt_updated=""
apt_update_once() {
    [[ -n $apt_updated ]] && return 0
    run apt-get update -q
    apt_updated=1
}
# Installing rsyslog, prometheus or nats-server must not start them as system
# services: the tests start their own, on free loopback ports. policy-rc.d is
# Debian's switch for that, in place only while apt runs.
without_service_starts() {
    local policy=/usr/sbin/policy-rc.d created=""
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; created=1
    fi
    local rc=0
    "$@" || rc=$?
    [[ -n $created ]] && rm -f "$policy"
    return $rc
}
if ((${#missing[@]})); then
    say "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt_update_once
    without_service_starts run apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- syslog-ng, unpacked beside rsyslog ----------------------------------------------
# Debian's syslog-ng-core conflicts with rsyslog (both provide system-log-daemon), yet
# the export tests check the syslog framing against both receivers. So syslog-ng is
# unpacked, not installed, under /opt/pymap-test/syslog-ng and run from there
# (tests/support finds it through PYMAP_SYSLOG_NG_ROOT or that default).
sng_root=/opt/pymap-test/syslog-ng
sng_libs=(libivykis0 libnet1 libjson-c5 libwrap0 libglib2.0-0 libpcre3 libcap2)
if [[ ! -x $sng_root/usr/sbin/syslog-ng ]]; then
    missing=()
    for p in "${sng_libs[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
        [[ $status == installed ]] || missing+=("$p")
    done
    export DEBIAN_FRONTEND=noninteractive
    if ((${#missing[@]})); then
        apt_update_once
        run apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
    tmp=$(mktemp -d)
    ( cd "$tmp" && apt-get download -q syslog-ng-core >/dev/null 2>&1 ) \
        || { apt_update_once; ( cd "$tmp" && apt-get download -q syslog-ng-core >/dev/null ); }
    mkdir -p "$sng_root"
    dpkg-deb -x "$tmp"/syslog-ng-core_*.deb "$sng_root"
    rm -rf "$tmp"
    say "unpacked syslog-ng under $sng_root (it conflicts with rsyslog as a package)"
fi

# --- bpffs and tracefs -----------------------------------------------------------------
mounted_as() { # <dir> <fstype>
    awk -v d="$1" -v t="$2" '$2 == d && $3 == t { found = 1 } END { exit !found }' /proc/mounts
}
mount_if_needed() { # <fstype> <dir> <why>
    if ! mounted_as "$2" "$1"; then
        mkdir -p "$2"
        mount -t "$1" "$1" "$2"
        say "mounted $1 at $2 ($3)"
    fi
}
mount_if_needed bpf /sys/fs/bpf "pinned maps live there"
mount_if_needed tracefs /sys/kernel/tracing "bcc tracepoints need it"

# --- kernel headers for bcc ------------------------------------------------------------
# Debian only ships headers for its own kernel; bcc needs *some* headers under
# /lib/modules/$(uname -r)/build to compile programs. Link the newest Debian ones, but
# only when nothing is there.
kver=$(uname -r)
moddir=/lib/modules/$kver
if [[ ! -e $moddir/build && ! -L $moddir/build ]]; then
    hdr=$(find /usr/src -maxdepth 1 -name 'linux-headers-*-amd64' -type d 2>/dev/null \
          | sort -V | tail -n 1)
    if [[ -z $hdr ]]; then
        say "warning: no kernel headers for $kver and none in /usr/src; bcc cannot compile programs"
    else
        common=${hdr%-amd64}-common
        mkdir -p "$moddir"
        ln -s "$hdr" "$moddir/build"
        linked="$moddir/build -> $hdr"
        if [[ -d $common && ! -e $moddir/source && ! -L $moddir/source ]]; then
            ln -s "$common" "$moddir/source"
            linked+=", $moddir/source -> $common"
        fi
        say "no kernel headers for $kver; linked $linked (bcc needs them to compile programs)"
    fi
elif [[ ! -e $moddir/build ]]; then
    say "warning: $moddir/build is a dangling symlink (-> $(readlink "$moddir/build")); left alone"
fi

# --- venv ------------------------------------------------------------------------------
# Must be built from Debian's python: only it matches the python3-bpfcc module.
venv=$root/.venv
if [[ -e $venv ]] && ! grep -qx 'home = /usr/bin' "$venv/pyvenv.cfg" 2>/dev/null; then
    say ".venv was not created by /usr/bin/python3; recreating it"
    rm -rf "$venv"
fi
if [[ ! -x $venv/bin/python ]]; then
    say "creating .venv with /usr/bin/python3"
    run /usr/bin/python3 -m venv "$venv"
fi
py=$venv/bin/python

# Link Debian's bcc into the venv (no --system-site-packages: that would leak every
# Debian python package into the venv).
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [[ ! -L $site/bcc || ! -f $site/bcc/__init__.py ]]; then
    bccdir=$(/usr/bin/python3 -c 'import bcc, os; print(os.path.dirname(bcc.__file__))' 2>/dev/null) \
        || die "Debian's /usr/bin/python3 cannot import bcc (is python3-bpfcc installed?)"
    rm -rf "${site:?}/bcc"
    ln -s "$bccdir" "$site/bcc"
    say "linked $site/bcc -> $bccdir"
fi

# Likewise libseccomp's binding (python3-seccomp): one extension module, the daemon's
# seccomp filter (watcher/kernel/sys/seccomp.py) is built with it.
seccomp_so=$(/usr/bin/python3 -c 'import seccomp; print(seccomp.__file__)' 2>/dev/null) \
    || die "Debian's /usr/bin/python3 cannot import seccomp (is python3-seccomp installed?)"
if [[ ! -L $site/$(basename "$seccomp_so") || ! -e $site/$(basename "$seccomp_so") ]]; then
    rm -f "$site/$(basename "$seccomp_so")"
    ln -s "$seccomp_so" "$site/$(basename "$seccomp_so")"
    say "linked $site/$(basename "$seccomp_so") -> $seccomp_so"
fi

# --- the project itself ------------------------------------------------------------------
stamp=$venv/.pymap-installed
# editable_mode=compat: a plain .pth path entry instead of setuptools' import-hook
# finder, which costs every `pymap` command ~10 ms of start-up (bench/bench_cli.py).
editable_mode=compat
want=$( (cat pyproject.toml; echo "editable_mode=$editable_mode") | sha256sum | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
if [[ $want != "$have" || ! -x $venv/bin/pymap ]]; then
    say "installing pymap (pip install -e '.[test]', editable_mode=$editable_mode)"
    run "$py" -m pip install --quiet --disable-pip-version-check \
        --config-settings editable_mode=$editable_mode -e '.[test]'
    echo "$want" >"$stamp"
fi

if ! err=$("$py" -c 'import bcc, trio, zmq, cattrs, typer, rich' 2>&1); then
    echo "$err" | sed 's/^/setup:   /' >&2
    die "the venv cannot import its dependencies (see above)"
fi
say "ready (.venv/bin/pymap)"
