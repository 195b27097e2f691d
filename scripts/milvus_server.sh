#!/usr/bin/env bash
# The real Milvus standalone server (PyPI's `milvus` wheel: the Milvus binary
# and an embedded etcd), for the engine's tests and benchmarks.
#
#   scripts/milvus_server.sh start DIR    # prints HOST:PORT once it is healthy
#   scripts/milvus_server.sh stop DIR
#   scripts/milvus_server.sh restart DIR  # after a stop: the same data and ports
#
# Its proxy and etcd take free ports; it also binds 9091 (health, or the
# next free port) and a few fixed internal ports, so one runs at a time. It
# is stopped with SIGINT (it ignores SIGTERM). The venv is .venv-milvus
# (made here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
cmd="${1:?start|stop|restart}"
dir="${2:?a data folder}"
venv=.venv-milvus

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

server_pid() {
  pgrep -f "$1/data/bin/milvus run" | head -1 || true
}

# Says why the server of folder $1 is not healthy: the first fatal or error
# line its log has since this start (a goroutine dump's tail does not say
# why it aborted), then the log's tail.
explain() {
  local from log
  from="$(cat "$1/log_from" 2>/dev/null || echo 0)"
  log="$(tail -c "+$((from + 1))" "$1/server.log")"
  echo "error: milvus-server $2; its first fatal or error line:" >&2
  grep -m1 -E '\[(FATAL|ERROR)\]|^panic:|^fatal error:|SIG(ABRT|SEGV)' <<<"$log" >&2 \
    || echo "(none)" >&2
  echo "its log's last lines:" >&2
  tail -20 <<<"$log" >&2
  exit 1
}

# Waits until the server of folder $1 answers its health check.
wait_healthy() {
  for _ in $(seq 1 120); do
    # The health endpoint's port is 9091 or the next free one after it
    # (the wrapper moves on when a port is taken, or in TIME_WAIT): the
    # server's METRICS_PORT says which.
    local server health
    server="$(server_pid "$1")"
    health="$(tr '\0' '\n' 2>/dev/null <"/proc/${server:-0}/environ" | sed -n 's/^METRICS_PORT=//p' || true)"
    if [ -n "$health" ] && curl -s -m 1 "http://127.0.0.1:$health/healthz" 2>/dev/null | grep -q OK; then
      return 0
    fi
    if ! kill -0 "$(cat "$1/pid")" 2>/dev/null; then
      explain "$1" "exited"
    fi
    sleep 1
  done
  explain "$1" "not healthy after 120 s"
}

case "$cmd" in
start)
  if [ ! -x "$venv/bin/milvus-server" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "milvus==2.3.5" >&2
  fi
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  port="$(free_port)"
  etcd="$(free_port)"
  echo 0 >"$dir/log_from"
  setsid "$venv/bin/milvus-server" --data "$dir/data" --proxy-port "$port" --etcd-port "$etcd" \
    >"$dir/server.log" 2>&1 </dev/null &
  echo $! >"$dir/pid"
  echo "$port" >"$dir/port"
  wait_healthy "$dir"
  # What restart needs to run the server again as the wrapper ran it.
  tr '\0' '\n' <"/proc/$(server_pid "$dir")/environ" \
    | grep -E '^(DEPLOY_MODE|METRICS_PORT|MILVUS_RUN_DIR|LD_LIBRARY_PATH)=' >"$dir/env"
  echo "127.0.0.1:$port"
  ;;
restart)
  # The binary itself, not the wrapper: the wrapper takes another port
  # when the old one still has connections in TIME_WAIT (it binds without
  # SO_REUSEADDR), and the server's clients expect the same address.
  [ -f "$dir/env" ] || { echo "error: no server was started in $dir" >&2; exit 1; }
  if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
    echo "error: the server in $dir is running; stop it first" >&2
    exit 1
  fi
  dir="$(cd "$dir" && pwd)"
  mapfile -t vars <"$dir/env"
  # The log goes on from the last run's: what went wrong is after this.
  wc -c <"$dir/server.log" >"$dir/log_from"
  (cd "$dir/data" && exec setsid env -i PATH="$PATH" "${vars[@]}" "$dir/data/bin/milvus" run standalone \
    >>"$dir/server.log" 2>&1 </dev/null) &
  echo $! >"$dir/pid"
  wait_healthy "$dir"
  echo "127.0.0.1:$(cat "$dir/port")"
  ;;
stop)
  [ -f "$dir/pid" ] || exit 0
  pid="$(cat "$dir/pid")"
  # The wrapper and the server it started share the session. The wrapper
  # kills the server 1 s after its SIGINT; the server alone (restart) takes
  # over 30 s to stop gracefully, and is killed after 5 s as the wrapper
  # would: its data outlives that.
  kill -INT -- "-$pid" 2>/dev/null || kill -INT "$pid" 2>/dev/null || true
  for _ in $(seq 1 10); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$dir/pid"
  ;;
*)
  echo "usage: $0 start|stop|restart DIR" >&2
  exit 2
  ;;
esac
