#!/usr/bin/env bash
# Start (or reuse) a pymap daemon, list the maps it sees, then follow events
# (or refresh the list every 2 s) until Ctrl-C. Stops only a daemon it started.
# A daemon it starts loads two example event sources with bcc (a process-exec
# tracer over a ring buffer, per-syscall counts in a hash map: see examples/),
# so there are live events on a fresh machine; without bcc it watches maps only.
set -euo pipefail

[[ $(id -u) -eq 0 ]] || { echo "demo: must run as root; try: sudo $0" >&2; exit 1; }
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pymap=.venv/bin/pymap
[[ -x $pymap ]] || { echo "demo: $pymap missing; run: make setup" >&2; exit 1; }

ping() { timeout 3 "$pymap" ping >/dev/null 2>&1; }

daemon_pid=""
log=""
stop_daemon() {
    trap - EXIT INT TERM
    if [[ -n $daemon_pid ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        echo "demo: stopping daemon (pid $daemon_pid)"
        kill "$daemon_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$daemon_pid" 2>/dev/null && kill -KILL "$daemon_pid" 2>/dev/null
        wait "$daemon_pid" 2>/dev/null || true
    fi
    [[ -n $log ]] && rm -f "$log"
    return 0
}
trap stop_daemon EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

sources=(--source examples/execsnoop-ringbuf/execsnoop.c:execs,drops=dropped
         --source examples/syscount/syscount.c)
follow=(execs syscounts)

# start_daemon ARGS...: start a daemon, wait for its ping; 0 if it answers, else 1
# (its log shown, the daemon gone).
start_daemon() {
    log=$(mktemp /tmp/pymap-demo.XXXXXX.log)
    "$pymap" daemon "$@" >"$log" 2>&1 &
    daemon_pid=$!
    echo "demo: started daemon (pid $daemon_pid, log $log)"
    # Compiling the example programs with bcc takes a few seconds on a small machine.
    local deadline=$((SECONDS + 60)) why=""
    until ping; do
        if ! kill -0 "$daemon_pid" 2>/dev/null; then
            why="daemon exited"
        elif ((SECONDS >= deadline)); then
            why="daemon did not answer ping within 60 s"
        fi
        if [[ -n $why ]]; then
            echo "demo: $why; its log:" >&2
            sed 's/^/  | /' "$log" >&2
            kill "$daemon_pid" 2>/dev/null || true
            wait "$daemon_pid" 2>/dev/null || true
            daemon_pid=""
            rm -f "$log"
            log=""
            return 1
        fi
        sleep 0.2
    done
}

if ping; then
    echo "demo: reusing the daemon that is already running"
    if ! "$pymap" status -o json 2>/dev/null | grep -q '"name":"execs"'; then
        echo "demo: it has no example event sources; following every map instead"
        follow=('*')
    fi
elif ! start_daemon "${sources[@]}"; then
    echo "demo: the example event sources did not load (is bcc set up? try: make setup);" \
         "watching maps only" >&2
    follow=('*')
    start_daemon || exit 1
fi

"$pymap" list

if "$pymap" events --help >/dev/null 2>&1; then
    echo "demo: following events of ${follow[*]} (Ctrl-C to stop)"
    "$pymap" events "${follow[@]}" -f
else
    while true; do
        sleep 2
        [[ -t 1 ]] && printf '\033[H\033[2J'
        echo "demo: $(date +%T)  pymap list  (every 2 s, Ctrl-C to stop)"
        "$pymap" list || echo "demo: pymap list failed"
    done
fi
