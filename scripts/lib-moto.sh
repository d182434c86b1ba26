# shellcheck shell=bash
# shellcheck disable=SC2034 # endpoint and moto_pid are for the sourcing script
# moto's S3 server on a free loopback port, for scripts/test.sh and the benchmarks. Source it.
#
#   start_moto LOG COMMAND...     start it (COMMAND: moto_server, or python3 -m moto.server);
#                                 tries three ports, up to 30 s each; sets $endpoint
#                                 (http://127.0.0.1:PORT) and $moto_pid; returns 1 (its log's
#                                 tail on stderr) if it never answered
#   stop_moto                     stop it (safe to call twice, or when it never started)

moto_pid=
endpoint=

stop_moto() {
    if [[ -n $moto_pid ]] && kill -0 "$moto_pid" 2>/dev/null; then
        kill "$moto_pid" 2>/dev/null || true
        wait "$moto_pid" 2>/dev/null || true
    fi
    moto_pid=
}

start_moto() {
    local log=$1 port attempt
    shift
    endpoint=
    for attempt in 1 2 3; do
        port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        "$@" -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
        moto_pid=$!
        # A cold Python start can be slow.
        for _ in $(seq 300); do
            if curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$port/"; then
                endpoint="http://127.0.0.1:$port"
                return 0
            fi
            kill -0 "$moto_pid" 2>/dev/null || break # it died (port taken?): try another port
            sleep 0.1
        done
        echo "moto did not answer on port $port (attempt $attempt); its log:" >&2
        tail -n 20 "$log" >&2 || true
        stop_moto
    done
    return 1
}
