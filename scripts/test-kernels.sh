#!/usr/bin/env bash
# make test-kernels: the kernel-facing tests on this machine's kernel and inside other
# real kernels, each booted under qemu (TCG) over this machine's root file system with
# virtme-ng (read-only root; /tmp is the guest's own). One table at the end: per kernel,
# tests passed/failed/skipped, what the kernel refuses, wall time. docs/kernels.md.
#
#   scripts/test-kernels.sh                 every kernel in KERNELS
#   KERNELS="host 6.1" scripts/test-kernels.sh
#   KT_TESTS="tests/test_dump.py" scripts/test-kernels.sh
#   scripts/test-kernels.sh --guest         (inside a kernel: mounts, probe, pytest)
#
# KERNELS: "host" and Debian series ("6.1", "6.12"); each series uses the newest generic
# amd64 kernel of it in /boot, installing it (and its headers, for bcc) when none is.
# GUEST_TIMEOUT (s, default 1500) bounds each guest, HOST_TIMEOUT (default 900) the host.
# Exit status: 0 when every kernel ran its tests and none failed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

# The selection: one or a few tests per kernel-facing area, small because Python under
# TCG is ~50x slower than here (a daemon start costs ~10 s there).
default_tests=(
    "tests/test_list.py::test_list_agrees_with_bpftool"            # list against bpftool
    "tests/test_get.py::test_get_every_type_agrees_with_bpftool"   # get against bpftool
    "tests/test_dump.py"                                           # dumps, batch buffers
    "tests/test_kdelta.py::test_both_engines_make_identical_events"  # both engines, diff
    "tests/test_kdelta.py::test_engine_choice_reasons"
    "tests/test_kdelta.py::test_each_route_is_chosen_from_the_probe_and_says_why"
    "tests/test_kdelta.py::test_output_larger_than_one_read_is_complete"  # overflow, both routes
    "tests/test_events.py::test_follow_hash_added_updated_removed"   # events -f
    "tests/test_mapwatch.py::test_creations_are_recorded_with_the_kernel_description"  # discovery
    "tests/test_sources_kernel.py::test_ringbuf_variable_records_in_bounded_slices"    # ring buffer
)
read -r -a tests <<<"${KT_TESTS:-${default_tests[*]}}"
PY=$root/.venv/bin/python
logs=$root/build/test-kernels  # one log per kernel, kept (build/ is not committed)

# ------------------------------------------------------------------------ in a kernel
# Runs as root on the kernel under test (the host's, or a guest's). Prints KT-* lines
# that the driver reads back.
guest() {
    local fs dir
    while read -r fs dir; do
        if ! awk -v d="$dir" -v t="$fs" '$2 == d && $3 == t { f = 1 } END { exit !f }' /proc/mounts; then
            mkdir -p "$dir" && mount -t "$fs" "$fs" "$dir"
        fi
    done <<<$'bpf /sys/fs/bpf\ntracefs /sys/kernel/tracing\nsecurityfs /sys/kernel/security'
    export PYMAP_REQUIRE_KERNEL=1 PYTHONDONTWRITEBYTECODE=1
    echo "KT-KERNEL $(uname -r) $(nproc) cpus, up $(cut -d' ' -f1 /proc/uptime) s"
    "$PY" -m watcher.kernel.features | sed 's/^/KT-FACILITY /'
    local rc=0
    "$PY" -m pytest -p no:cacheprovider -q -ra --durations=5 "${tests[@]}" || rc=$?
    echo "KT-PYTEST-RC $rc"
}

if [[ ${1:-} == --guest ]]; then
    shift
    (($#)) && tests=("$@")  # a guest does not inherit KT_TESTS: the driver passes them
    guest
    exit 0
fi

# ------------------------------------------------------------------------ the driver
say() { echo "test-kernels: $*"; }
die() { echo "test-kernels: error: $*" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || die "must run as root (bpf, mounts, apt)"
[[ $(uname -m) == x86_64 ]] || die "the guests are Debian amd64 kernels; this is $(uname -m)"

read -r -a kernels <<<"${KERNELS:-host 6.1 6.12}"
GUEST_TIMEOUT=${GUEST_TIMEOUT:-1500}
HOST_TIMEOUT=${HOST_TIMEOUT:-900}
# A guest's test deadlines (a daemon's start, an event's arrival) stretch by this factor:
# under TCG one Python process takes ~10 s to start. The host's run keeps them as they are.
TIME_SCALE=${TIME_SCALE:-8}
VNG_VERSION=1.42
vng_venv=$root/.venv-vng

installed() { [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]; }
apt_updated=""
apt_install() { # packages...; a failing kernel hook (update-grub, initramfs) is dpkg's to report
    export DEBIAN_FRONTEND=noninteractive
    if [[ -z $apt_updated ]]; then apt-get update -q >/dev/null; apt_updated=1; fi
    say "apt-get install $*"
    apt-get install -y -q --no-install-recommends "$@" 2>&1 | sed -u 's/^/test-kernels:   /'
    return "${PIPESTATUS[0]}"
}

# The newest generic (not cloud, not rt) amd64 kernel of a Debian series in /boot.
kernel_in_boot() { # series
    local f best=""
    for f in /boot/vmlinuz-"$1".*-amd64 /boot/vmlinuz-"$1"[.-]*-amd64; do
        [[ -e $f && $f != *cloud* && $f != *-rt-* ]] || continue
        best+="${f#/boot/vmlinuz-}"$'\n'
    done
    [[ -n $best ]] && sort -uV <<<"$best" | sed '/^$/d' | tail -n 1
}

# The newest release of a series in apt (6.1.0-57-amd64, 6.12.113+deb12-amd64), or "".
kernel_in_apt() { # series
    if [[ -z $apt_updated ]]; then apt-get update -q >/dev/null; apt_updated=1; fi
    apt-cache search --names-only "^linux-image-$1[.-].*-amd64-unsigned\$" \
        | awk '{ print $1 }' | sed 's/^linux-image-//; s/-unsigned$//' \
        | grep -v -e cloud -e -rt- | sort -V | tail -n 1
}

ensure_kernel() { # series -> prints the release to boot, or nothing
    local rel
    rel=$(kernel_in_boot "$1")
    if [[ -z $rel ]]; then
        rel=$(kernel_in_apt "$1")
        [[ -n $rel ]] || { say "no linux-image-$1 in apt" >&2; return 0; }
        # headers too: bcc compiles the tests' C programs for the guest's kernel
        apt_install "linux-image-$rel-unsigned" "linux-headers-$rel" >&2 \
            || say "apt-get exited non-zero installing $rel (a boot-loader hook?); using the image if it is there" >&2
        [[ -e /boot/vmlinuz-$rel ]] || { say "no /boot/vmlinuz-$rel after install" >&2; return 0; }
    elif ! installed "linux-headers-$rel"; then
        apt_install "linux-headers-$rel" >&2 || say "no headers for $rel: bcc tests will fail there" >&2
    fi
    echo "$rel"
}

need=()
for p in busybox-static qemu-system-x86; do installed "$p" || need+=("$p"); done
((${#need[@]} == 0)) || apt_install "${need[@]}" || die "apt-get install ${need[*]} failed"

if [[ ! -x $vng_venv/bin/vng ]] || ! "$vng_venv/bin/pip" show virtme-ng 2>/dev/null \
        | grep -qx "Version: $VNG_VERSION"; then
    say "installing virtme-ng $VNG_VERSION into $vng_venv"
    [[ -x $vng_venv/bin/python ]] || /usr/bin/python3 -m venv "$vng_venv" || die "venv failed"
    "$vng_venv/bin/pip" install -q --disable-pip-version-check "virtme-ng==$VNG_VERSION" 2>&1 \
        | grep -v "^WARNING: Location 'file:" || true
    [[ -x $vng_venv/bin/vng ]] || die "virtme-ng did not install"
fi
[[ -x $PY ]] || die "no .venv (make setup)"

mkdir -p "$logs"
rm -f "$logs"/*.log
current=""  # the process group of the kernel being run (setsid: its pid)
cleanup() {
    [[ -n $current ]] && kill -KILL -- "-$current" 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Run one kernel; its output goes to $logs/<name>.log (and to the terminal, prefixed).
run_one() { # name log
    local name=$1 log=$2 rel limit=$GUEST_TIMEOUT
    if [[ $name == host ]]; then
        limit=$HOST_TIMEOUT
        setsid timeout -k 10 "$limit" bash scripts/test-kernels.sh --guest "${tests[@]}" \
            </dev/null >"$log" 2>&1 &
    else
        rel=$(ensure_kernel "$name")
        if [[ -z $rel ]]; then
            echo "KT-ERROR no $name kernel to boot" >"$log"
            return
        fi
        echo "KT-BOOT $rel" >"$log"
        # timeout signals its whole process group (vng and qemu) when time is up
        setsid timeout -k 10 "$limit" env PATH="$vng_venv/bin:$PATH" \
            vng --run "/boot/vmlinuz-$rel" --disable-kvm --force-9p --memory 2G --cpus 2 \
            --cwd "$root" -- "PYMAP_TEST_TIME_SCALE=$TIME_SCALE bash scripts/test-kernels.sh --guest ${tests[*]@Q}" </dev/null >>"$log" 2>&1 &
    fi
    local pid=$!
    current=$pid
    tail -n +1 -f --pid="$pid" "$log" 2>/dev/null | sed -u "s/^/[$name] /" &
    local tailer=$!
    local rc=0
    wait "$pid" || rc=$?
    wait "$tailer" 2>/dev/null
    if pgrep -g "$pid" >/dev/null; then  # nothing of it may outlive it (qemu included)
        say "killing what is left of the $name run: $(pgrep -g "$pid" | tr '\n' ' ')"
        kill -KILL -- "-$pid" 2>/dev/null
    fi
    current=""
    ((rc == 124 || rc == 137)) && echo "KT-ERROR timed out after ${limit}s" >>"$log"
    echo "KT-EXIT $rc" >>"$log"
}

# One table row from a log: kernel passed failed skipped lockdown refused wall note.
# What the kernel refuses comes from the daemon's own feature probe
# (python -m watcher.kernel.features, run in the kernel before its tests).
row() { # name log seconds
    "$PY" - "$@" <<'EOF'
import json, re, sys
name, log, secs = sys.argv[1], sys.argv[2], int(sys.argv[3])
text = open(log, errors="replace").read().replace("\r", "")
kernel = re.search(r"^KT-KERNEL (\S+)", text, re.M)
facilities = [json.loads(m.group(1))
              for m in re.finditer(r"^KT-FACILITY (\{.*\})", text, re.M)]
summary = None
for m in re.finditer(r"^=*\s*((?:\d+ \w+, )*\d+ \w+) in [\d.]+s", text, re.M):
    summary = m.group(1)
counts = {}
if summary:
    for n, what in re.findall(r"(\d+) (\w+)", summary):
        counts[what.rstrip("s") if what != "passed" else what] = int(n)
lockdown = next((f["detail"].partition(":")[0].removeprefix("lockdown=")
                 for f in facilities if f["name"] == "lockdown"), "-")
refused = ", ".join(f"{f['name']} {f['error']}" for f in facilities
                    if f["state"] == "refused") or ("none" if facilities else "-")
err = re.search(r"^KT-ERROR (.*)", text, re.M)
bad = [m.group(2).split("::", 1)[-1].split("[")[0]
       for m in re.finditer(r"^(FAILED|ERROR) (\S+)", text, re.M)]
note = err.group(1) if err else ("" if summary else "pytest did not report (see log)")
if bad:
    note = "; ".join(filter(None, [note, "failed: " + ", ".join(dict.fromkeys(bad))]))
cols = [kernel.group(1) if kernel else name,
        str(counts.get("passed", 0)) if summary else "-",
        str(counts.get("failed", 0) + counts.get("error", 0)) if summary else "-",
        str(counts.get("skipped", 0)) if summary else "-"]
cols += [lockdown, refused]
cols += [f"{secs // 60}m{secs % 60:02d}s", note]
print("\t".join(cols))
EOF
}

say "kernels: ${kernels[*]}; tests: ${tests[*]}"
start_all=$SECONDS
rows=()
failed=0
for i in "${!kernels[@]}"; do
    name=${kernels[$i]}
    log=$logs/$name.log
    say "=== $name"
    t0=$SECONDS
    run_one "$name" "$log"
    secs=$((SECONDS - t0))
    r=$(row "$name" "$log" "$secs")
    rows+=("$r")
    IFS=$'\t' read -r -a c <<<"$r"
    [[ ${c[1]} != - && ${c[2]} == 0 ]] || failed=1
done

echo
{
    printf 'kernel\tpassed\tfailed\tskipped\tlockdown\tfacilities refused (probe)\twall\tnote\n'
    printf '%s\n' "${rows[@]}"
} | "$PY" -c '
import sys
rows = [line.rstrip("\n").split("\t") for line in sys.stdin]
widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
for r in rows:
    print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    if r is rows[0]:
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
'
total=$((SECONDS - start_all))
say "logs in ${logs#"$root"/}/"
say "total wall time $((total / 60))m$((total % 60))s"
exit "$failed"
