#!/usr/bin/env bash
# `make image`: the pymap OCI image, built from Debian packages and PyPI wheels only
# (no image registry is needed or reached). Idempotent: a rerun with nothing changed
# takes a few seconds.
#
#   1. mmdebstrap: a minimal Debian 12 root file system (--variant=minbase) with python3,
#      bcc (python3-bpfcc) and libseccomp's binding; cached as build/image/rootfs.tar,
#      rebuilt only when the package list below changes.
#   2. podman import: that tarball becomes localhost/pymap-base:bookworm.
#   3. python -m build: pymap's wheel; pip download: its dependencies' wheels.
#   4. podman build (Containerfile): a venv in /opt/pymap over Debian's python3 with
#      --system-site-packages (bcc and seccomp are Debian's), pymap installed from those
#      wheels offline, /opt/pymap/bin on PATH. Tagged localhost/pymap:VERSION and :latest.
#
# This host's root lacks CAP_SYS_RESOURCE: podman's default runtime crun fails on
# setrlimit. So runc is installed and /etc/containers/containers.conf says
# runtime = "runc" and default_ulimits = [] (docs/install.md, "The container image").
set -euo pipefail

say() { echo "image: $*"; }
die() { echo "image: error: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "must run as root (mmdebstrap and podman need it)"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
out=$root/build/image
mkdir -p "$out"
start=$SECONDS

# --- tools ---------------------------------------------------------------------------
tools=(podman runc mmdebstrap)
missing=()
for p in "${tools[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [[ $status == installed ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

conf=/etc/containers/containers.conf
if [[ ! -e $conf ]]; then
    mkdir -p "$(dirname "$conf")"
    cat >"$conf" <<'CONF'
# Written by pymap's scripts/image.sh: root here lacks CAP_SYS_RESOURCE, so the
# runtime must not set rlimits (crun fails on setrlimit RLIMIT_NOFILE); runc runs.
[containers]
default_ulimits = []

[engine]
runtime = "runc"
CONF
    say "wrote $conf (runtime runc, no default ulimits)"
elif ! grep -q '^default_ulimits *= *\[\]' "$conf" || ! grep -q '^runtime *= *"runc"' "$conf"; then
    die "$conf exists but does not set default_ulimits = [] under [containers] and runtime = \"runc\" under [engine]; add them"
fi

# --- 1, 2: the base ------------------------------------------------------------------
# What bcc needs is what python3-bpfcc depends on (libbpfcc, LLVM and clang 14 libraries:
# most of the image). No compiler, no kernel headers: those come from the host's
# /lib/modules and /usr/src, mounted read-only, only for sources that compile programs.
base_packages=python3,python3-venv,python3-bpfcc,python3-seccomp
# Nothing pymap reads: manuals, docs (copyrights kept), translations. Removed by a
# customize hook (dpkg's path-exclude breaks readline-common's man page diversion).
strip='cd "$1" && rm -rf usr/share/man usr/share/info usr/share/locale usr/share/lintian &&
 find usr/share/doc -type f ! -name copyright -delete'
key=$(printf '%s\n' "$base_packages" "$strip" merged-usr | sha256sum | cut -c1-12)
rootfs=$out/rootfs-$key.tar
base=localhost/pymap-base:bookworm-$key
if [[ ! -s $rootfs ]]; then
    say "mmdebstrap bookworm --variant=minbase --include=$base_packages"
    t=$SECONDS
    rm -f "$out"/rootfs-*.tar "$out/partial.tar"
    # The merged-usr hook does what the usrmerge package would, without perl (30 MB).
    mmdebstrap --quiet --variant=minbase --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --include="$base_packages" --customize-hook="$strip" bookworm "$out/partial.tar" \
        >"$out/mmdebstrap.log" 2>&1 \
        || { tail -n 20 "$out/mmdebstrap.log" >&2; die "mmdebstrap failed (log: $out/mmdebstrap.log)"; }
    mv "$out/partial.tar" "$rootfs"
    say "rootfs $(du -h "$rootfs" | cut -f1) in $((SECONDS - t)) s"
fi
if ! podman image exists "$base"; then
    podman import --quiet "$rootfs" "$base" >/dev/null
    say "imported $base"
fi

# --- 3: wheels -----------------------------------------------------------------------
py=$root/.venv/bin/python
[[ -x $py ]] || die "no .venv (run make setup first)"
version=$("$py" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
wheels=$out/wheels
src_key=$( { git ls-files -z pyproject.toml watcher consumers | xargs -0 sha256sum; } | sha256sum | cut -c1-12)
if [[ ! -e $wheels/.src-$src_key ]]; then
    rm -rf "$wheels" "$out/dist"
    mkdir -p "$wheels"
    "$py" -m build --wheel --outdir "$out/dist" . >"$out/build.log" 2>&1 \
        || { tail -n 20 "$out/build.log" >&2; die "python -m build failed (log: $out/build.log)"; }
    cp "$out"/dist/pymap-*.whl "$wheels/"
    # Same interpreter as the image (Debian's python3.11), so the same wheels fit; pip
    # wheel also builds the few dependencies PyPI has only as sources (nkeys).
    "$py" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$wheels" "$out"/dist/pymap-*.whl 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
    touch "$wheels/.src-$src_key"
    say "wheels: $(ls "$wheels"/*.whl | wc -l) in $wheels"
fi

# --- 4: the image --------------------------------------------------------------------
image=localhost/pymap:$version
label_key=$(cat Containerfile "$wheels/.src-$src_key" <(echo "$base") | sha256sum | cut -c1-12)
if [[ $(podman image inspect --format '{{index .Labels "pymap.build-key"}}' "$image" 2>/dev/null) != "$label_key-$src_key" ]]; then
    t=$SECONDS
    mkdir -p "$out/context"
    # --no-cache: the RUN step reads /wheels, a volume the layer cache cannot see change.
    podman build --quiet --no-cache --file Containerfile --build-arg BASE="$base" \
        --label "pymap.build-key=$label_key-$src_key" \
        --volume "$wheels:/wheels:ro" --network none \
        --tag "$image" --tag localhost/pymap:latest "$out/context" >/dev/null
    say "built $image in $((SECONDS - t)) s"
    podman image prune --force >/dev/null
fi
size=$(podman image inspect --format '{{.Size}}' "$image")
say "$image: $((size / 1000000)) MB ($((SECONDS - start)) s)"
