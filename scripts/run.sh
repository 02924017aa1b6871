#!/usr/bin/env bash
# `make run`: one model worker and the web server against Redis; Ctrl-C stops everything it started.
# Redis: REDIS_URL when set; else whatever answers on 127.0.0.1:6379; else a private redis-server we start.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
pids=()
redis_pid=

stop() {
  trap - INT TERM EXIT
  # Services first, so that a worker can still hand its unfinished jobs back; our Redis last.
  [ ${#pids[@]} -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  [ -n "$redis_pid" ] && kill -TERM "$redis_pid" 2>/dev/null && wait "$redis_pid" 2>/dev/null || true
}
trap stop INT TERM EXIT

redis_answers() {
  (exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && read -r -t 2 reply <&3 && [[ $reply == +PONG* ]]) \
    2>/dev/null
}

if [ -z "${REDIS_URL:-}" ]; then
  if ! redis_answers; then
    bash scripts/install_system.sh redis-server
    mkdir -p .redis
    echo "starting a private redis-server on 127.0.0.1:6379 (data in .redis/, not saved)" >&2
    setsid "$PY" launcher.py redis-server 6379 "$PWD/.redis" --logfile "$PWD/.redis/redis.log" &
    redis_pid=$!
    for _ in $(seq 50); do redis_answers && break; sleep 0.1; done
  fi
  export REDIS_URL=redis://127.0.0.1:6379/0
fi

export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
# Each service in its own session: Ctrl-C reaches only this script, which then sends each one a single
# SIGTERM. A second signal landing inside gunicorn's own signal handler can deadlock its worker.
setsid "$PY" run_model_server.py &
pids+=($!)
setsid "$PY" run_web_server.py &
pids+=($!)
echo "serving on http://${HOST:-127.0.0.1}:${PORT:-5000} — try: $PY simple_request.py (Ctrl-C stops)" >&2
wait -n "${pids[@]}"
