# Shared by bench/run.sh, auth.sh, floor.sh and callgrind-request.sh (sourced, not run). See
# bench/README.md.
#
# Provides: logging, argument checks, tool installation, a temp dir with an EXIT trap that
# stops every background process recorded in PIDS, free ports, readiness checks, CPU and
# peak-RSS readings from /proc, the release build, the nginx upstream and a watchdogged
# background wrk.
#
# The sourcing script sets `set -euo pipefail` and calls, in this order:
#   bench_setup_work   (temp dir + traps; after argument checks)
#   ensure_tools / build_gateway / start_upstream ...

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_DIR="$ROOT/bench"

# Where the reports go. By default outside the repository, so a run leaves the tracked tree
# as it was: $TMPDIR/stepgate-bench (or /tmp/stepgate-bench). Into bench/results/ (tracked)
# only when asked: BENCH_KEEP=1, or BENCH_OUT=bench/results. BENCH_OUT names any directory;
# a relative one is taken from the directory the script was started in.
if [[ -n "${BENCH_OUT:-}" ]]; then
    RESULTS_DIR="$BENCH_OUT"
    [[ "$RESULTS_DIR" == /* ]] || RESULTS_DIR="$PWD/$RESULTS_DIR"
elif [[ "${BENCH_KEEP:-0}" == 1 ]]; then
    RESULTS_DIR="$BENCH_DIR/results"
elif [[ "${BENCH_KEEP:-0}" == 0 ]]; then
    RESULTS_DIR="${TMPDIR:-/tmp}/stepgate-bench"
else
    printf '[bench] error: BENCH_KEEP must be 0 or 1 (got %s)\n' "$BENCH_KEEP" >&2
    exit 1
fi

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- arguments

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# wrk durations: 10, 10s, 2m, 1h -> whole seconds (used for the watchdog).
duration_seconds() {
    local d="$1"
    [[ "$d" =~ ^([0-9]+)([smh]?)$ ]] || return 1
    local n="${BASH_REMATCH[1]}"
    case "${BASH_REMATCH[2]}" in
        m) echo $((n * 60)) ;;
        h) echo $((n * 3600)) ;;
        *) echo "$n" ;;
    esac
}

# ---------------------------------------------------------------- tools

ensure_tools() {
    local missing=()
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
    if ((${#missing[@]})); then
        command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
        local sudo=()
        if ((EUID != 0)); then
            command -v sudo >/dev/null 2>&1 || die "missing ${missing[*]}; run as root or install them"
            sudo=(sudo)
        fi
        log "installing ${missing[*]}"
        # RUNLEVEL=1 keeps invoke-rc.d from starting the packaged nginx service.
        if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
                apt-get install -y -q "${missing[@]}" >&2; then
            log "install failed; refreshing package lists (apt-get update) and retrying"
            "${sudo[@]}" apt-get update -q >&2
            "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
                apt-get install -y -q "${missing[@]}" >&2
        fi
    fi
    command -v python3 >/dev/null 2>&1 || die "python3 is required (port selection and the report)"
    command -v cargo >/dev/null 2>&1 || die "cargo is required"
    command -v timeout >/dev/null 2>&1 || die "timeout (coreutils) is required"
    NGINX_BIN="$(command -v nginx || echo /usr/sbin/nginx)"
    CLK_TCK="$(getconf CLK_TCK)"
}

# ---------------------------------------------------------------- temp dir, cleanup

PIDS=()          # every background process we started, stopped in reverse order
PGROUPS=()       # process groups we started with setsid (cargo and its rustc children)

stop_pid() {
    local pid="$1" i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do           # up to 5 s to exit gracefully
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# forget_pid PID: drop PID from PIDS once it has been waited for.
forget_pid() {
    local i
    for i in "${!PIDS[@]}"; do
        [[ "${PIDS[i]}" == "$1" ]] && unset 'PIDS[i]'
    done
    PIDS=("${PIDS[@]}")
}

# stop_group PGID: TERM to the whole process group, KILL after 5 s.
stop_group() {
    local pgid="$1" i
    kill -TERM -- "-$pgid" 2>/dev/null || kill -TERM "$pgid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 -- "-$pgid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$pgid" 2>/dev/null || true
    wait "$pgid" 2>/dev/null || true
}

bench_cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local i
    for ((i = ${#PGROUPS[@]} - 1; i >= 0; i--)); do
        stop_group "${PGROUPS[i]}"
    done
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${PIDS[i]}"
    done
    # Keep the logs after a failure (not after Ctrl-C / TERM) for inspection.
    if [[ -n "${WORK:-}" && -d "$WORK" ]]; then
        if ((KEEP_WORK || (status != 0 && status != 130 && status != 143))); then
            log "logs kept in $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$status"
}

# bench_setup_work PREFIX: the temp dir ($WORK) and the traps that clean up after us.
bench_setup_work() {
    KEEP_WORK="${BENCH_KEEP_LOGS:-0}"   # 1: keep the temp dir (configs, logs) even on success
    [[ "$KEEP_WORK" == 0 || "$KEEP_WORK" == 1 ]] || KEEP_WORK=1
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")"
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# run_waited CMD...: runs CMD in its own session (setsid) in the background and waits for
# it. bash runs a trap only between foreground commands, so a long foreground command
# (a build, the seeding) would delay Ctrl-C until it ends; `wait` is interrupted at once,
# and the EXIT trap then stops CMD's whole process group.
run_waited() {
    local pid rc=0
    if command -v setsid >/dev/null 2>&1; then
        setsid -w "$@" &
        pid=$!
        PGROUPS+=("$pid")
    else
        "$@" &
        pid=$!
        PIDS+=("$pid")
    fi
    wait "$pid" || rc=$?
    local i
    for i in "${!PGROUPS[@]}"; do [[ "${PGROUPS[i]}" == "$pid" ]] && unset 'PGROUPS[i]'; done
    PGROUPS=("${PGROUPS[@]}")
    forget_pid "$pid"
    return "$rc"
}

# ---------------------------------------------------------------- helpers

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# http_status PORT PATH ["Header: value" ...]: prints the status of GET PATH (000 when no
# answer).
http_status() {
    python3 - "$@" <<'PY' 2>/dev/null || echo 000
import sys, urllib.request, urllib.error
port, path = sys.argv[1], sys.argv[2]
req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
for header in sys.argv[3:]:
    name, value = header.split(":", 1)
    req.add_header(name.strip(), value.strip())
try:
    with urllib.request.urlopen(req, timeout=1) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
PY
}

# gateway_yaml_head DIR: the top of a bench gateway.yaml for a gateway under DIR: listening on
# $GATEWAY_PORT, data in DIR/data, the admin API on $ADMIN_PORT, policies from DIR/policies.
gateway_yaml_head() {
    cat <<EOF
listen: 127.0.0.1:$GATEWAY_PORT
data_dir: $1/data
admin: { listen: 127.0.0.1:$ADMIN_PORT }
policies_dir: policies
EOF
}

# cli ARGS...: the stepgate CLI (JSON output) for the gateway of $GW/gateway.yaml, through its
# admin API. json EXPR: prints EXPR of the JSON on stdin (json '["api_key"]').
cli() { "$GATEWAY_BIN" "$@" --json -c "$GW/gateway.yaml"; }
json() { python3 -c "import sys, json; print(json.load(sys.stdin)$1)"; }

# totp SECRET [STEPS_BACK]: the code of this 30-s step (or of one before: each code counts once,
# so enrolment and the step-up use different ones).
totp() {
    python3 - "$1" "${2:-0}" <<'PY'
import base64, hashlib, hmac, struct, sys, time
key = base64.b32decode(sys.argv[1] + "=" * (-len(sys.argv[1]) % 8))
step = int(time.time()) // 30 - int(sys.argv[2])
mac = hmac.new(key, struct.pack(">Q", step), hashlib.sha1).digest()
offset = mac[-1] & 15
print("%06d" % ((struct.unpack(">I", mac[offset:offset + 4])[0] & 0x7FFFFFFF) % 1000000))
PY
}

# ban_consumer PORT PATH KEY: sends the consumer's key with wrong codes to PATH (a route whose
# policy wants a second factor) until the gateway answers 429, i.e. the consumer is banned.
ban_consumer() {
    python3 - "$@" <<'PY'
import sys, urllib.request, urllib.error
port, path, key = sys.argv[1:]
for attempt in range(1, 101):
    # A different code each time; one that happens to be right just does not count.
    code = "%06d" % attempt
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"X-Api-Key": key, "X-OTP": code})
    try:
        urllib.request.urlopen(req, timeout=30).close()
    except urllib.error.HTTPError as e:
        if e.code == 429:
            sys.exit(0)
sys.exit(f"no ban after {attempt} wrong codes")
PY
}

# http_ok PORT: exit 0 when GET / answers 200.
http_ok() { [[ "$(http_status "$1" /)" == 200 ]]; }

# wait_ready NAME PID PORT LOG [PATH] [STATUS] [HEADER]: up to ~10 s for STATUS (default 200)
# on GET PATH (default /); fails with the process's log.
wait_ready() {
    local name="$1" pid="$2" port="$3" logfile="$4" path="${5:-/}" want="${6:-200}" header="${7:-}" i
    local args=("$port" "$path")
    [[ -n "$header" ]] && args+=("$header")
    for ((i = 0; i < 100; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "$name exited during start-up; its log ($logfile):"
            sed 's/^/    /' "$logfile" >&2 || true
            return 1
        fi
        [[ "$(http_status "${args[@]}")" == "$want" ]] && return 0
        sleep 0.1
    done
    log "$name did not answer $want on 127.0.0.1:$port$path within 10 s; its log ($logfile):"
    sed 's/^/    /' "$logfile" >&2 || true
    return 1
}

# cpu_ticks PID: utime + stime (all threads) in clock ticks.
cpu_ticks() {
    local stat rest f total=0 pid
    # The process and its children (an nginx master's workers; the gateway has none).
    for pid in "$1" $(pgrep -P "$1" || true); do
        stat="$(<"/proc/$pid/stat")" || continue
        rest="${stat##*) }"      # drop "pid (comm) ", comm may contain spaces
        read -ra f <<<"$rest"    # f[0] is field 3 (state): utime=14, stime=15
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

vm_hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
vm_rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# reset_hwm PID: restart the peak-RSS watermark at the current RSS (Linux >= 4.0,
# `echo 5 > clear_refs`); returns 1 when the kernel refuses, and VmHWM is then the peak
# since start.
reset_hwm() { { echo 5 >"/proc/$1/clear_refs"; } 2>/dev/null; }

# settle PID: wait (at most ~10 s) until PID is idle, i.e. used at most one clock tick in
# 0.5 s, so work a run left behind (background writes) is counted with that run and does
# not leak into the next one.
settle() {
    local pid="$1" i a b
    for ((i = 0; i < 20; i++)); do
        a="$(cpu_ticks "$pid")"
        sleep 0.5
        b="$(cpu_ticks "$pid")"
        ((b - a <= 1)) && return 0
    done
    log "pid $pid still busy after 10 s; going on"
}

# ---------------------------------------------------------------- build

build_gateway() {
    log "building the gateway (cargo build --release)"
    run_waited bash -c 'cd "$1" && exec cargo build --release' bench-build "$ROOT" \
        || die "cargo build --release failed"
    GATEWAY_BIN="$ROOT/target/release/stepgate"
    [[ -x "$GATEWAY_BIN" ]] || die "$GATEWAY_BIN not found after the build"
}

# ---------------------------------------------------------------- nginx

# nginx_conf_head DIR [WORKERS]: the top of an nginx.conf, in the foreground. One worker
# (the default): one process (master_process off). More: a master and WORKERS worker
# processes, as many as the gateway's worker threads for a like-for-like run (cpu_ticks
# counts the master's children).
nginx_conf_head() {
    local dir="$1" workers="${2:-1}"
    cat <<EOF
daemon off;
master_process $( ((workers > 1)) && echo on || echo off);
worker_processes $workers;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 8192; }
EOF
}

nginx_http_common() {
    local dir="$1"
    cat <<EOF
    access_log off;
    keepalive_requests 100000;
    keepalive_timeout 75s;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
EOF
}

# start_nginx_with NAME DIR CONF_FN PATH STATUS [HEADER]: writes DIR/nginx.conf with
# `CONF_FN DIR PORT` on a free port and starts nginx; sets NGINX_STARTED_PID and
# NGINX_STARTED_PORT. Retries (3x) when the port was taken meanwhile.
start_nginx_with() {
    local name="$1" dir="$2" conf_fn="$3" path="$4" want="$5" header="${6:-}" attempt port pid
    mkdir -p "$dir/tmp" "$dir/logs"
    for ((attempt = 1; attempt <= 3; attempt++)); do
        port="$(free_port)"
        "$conf_fn" "$dir" "$port" >"$dir/nginx.conf"
        "$NGINX_BIN" -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log" \
            >"$dir/logs/stdout.log" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        if wait_ready "$name" "$pid" "$port" "$dir/logs/error.log" "$path" "$want" "$header"; then
            NGINX_STARTED_PID="$pid"
            NGINX_STARTED_PORT="$port"
            return 0
        fi
        stop_pid "$pid"
        forget_pid "$pid"
        grep -qi 'address already in use' "$dir/logs/error.log" "$dir/logs/stdout.log" 2>/dev/null \
            || break
        log "port $port was taken meanwhile; retrying"
    done
    die "$name failed to start (config: $dir/nginx.conf)"
}

upstream_conf() {
    local dir="$1" port="$2"
    nginx_conf_head "$dir"
    echo "http {"
    nginx_http_common "$dir"
    cat <<EOF
    server {
        listen 127.0.0.1:$port;
        location / { return 200 "ok\n"; }
    }
}
EOF
}

# nginx_keymap_conf DIR PORT: nginx doing an API-key check with a `map` of the keys in
# DIR/keys.map (`"KEY" 1;` lines), proxying to the upstream on keep-alive connections: the
# closest nginx comes to the gateway's API-key route.
nginx_keymap_conf() {
    local dir="$1" port="$2" n max
    n="$(wc -l <"$dir/keys.map")"
    max=1024
    while ((max < 4 * n)); do max=$((max * 2)); done
    nginx_conf_head "$dir" "${NGINX_KEYMAP_WORKERS:-1}"
    echo "http {"
    nginx_http_common "$dir"
    cat <<EOF
    map_hash_max_size $max;
    map_hash_bucket_size 128;     # keys are 76 characters
    map \$http_x_api_key \$key_ok {
        default 0;
        include $dir/keys.map;
    }
    upstream backend {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$port;
        location / {
            if (\$key_ok = 0) { return 401; }
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Api-Key "";   # like stepgate: the key is not forwarded
        }
    }
}
EOF
}

# start_upstream: the nginx `return 200` upstream; sets NGINX_PID and UPSTREAM_PORT.
start_upstream() {
    start_nginx_with nginx "$WORK/nginx" upstream_conf / 200
    NGINX_PID="$NGINX_STARTED_PID"
    UPSTREAM_PORT="$NGINX_STARTED_PORT"
}

# ---------------------------------------------------------------- redis

# start_redis: a redis-server of our own on a free port, configured as a gateway cluster needs
# it (AOF with fsync on every write, no eviction), its files in $WORK/redis; sets REDIS_PID
# and REDIS_PORT.
start_redis() {
    command -v redis-server >/dev/null 2>&1 || die "redis-server is not installed (apt-get install redis-server)"
    mkdir -p "$WORK/redis"
    REDIS_PORT="$(free_port)"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" \
        --appendonly yes --appendfsync always --save "" --maxmemory-policy noeviction \
        --logfile "$WORK/redis/redis.log" &
    REDIS_PID=$!
    PIDS+=("$REDIS_PID")
    local i
    for ((i = 0; i < 100; i++)); do
        [[ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]] && return 0
        sleep 0.1
    done
    die "redis-server did not start; its log: $WORK/redis/redis.log"
}

# redis_store_yaml: the `store:` section of a gateway on that Redis.
redis_store_yaml() {
    printf 'store: { redis: { url: "redis://127.0.0.1:%s" } }\n' "$REDIS_PORT"
}

# redis_calls: the number of commands Redis has run so far (all clients; INFO commandstats).
redis_calls() {
    redis-cli -p "$REDIS_PORT" info commandstats \
        | awk -F'[=,:]' '/^cmdstat_/ { n += $3 } END { print n + 0 }'
}

# ---------------------------------------------------------------- wrk

# run_wrk_bg OUT SECS wrk-args...: starts wrk in the background under a watchdog (killed
# SECS + 30 s after start), so the trap can stop it and it never outlives its duration by
# much; at nice $WRK_NICE when set. Sets WRK_PID; finish with wait_wrk.
run_wrk_bg() {
    local out="$1" secs="$2"
    shift 2
    nice -n "${WRK_NICE:-0}" timeout -s KILL $((secs + 30)) wrk "$@" >"$out" 2>&1 &
    WRK_PID=$!
    PIDS+=("$WRK_PID")
}

# wait_wrk PID OUT: waits for a run_wrk_bg; fails (with its output) when wrk failed.
wait_wrk() {
    local pid="$1" out="$2" rc=0
    wait "$pid" || rc=$?
    forget_pid "$pid"
    if ((rc != 0)); then
        log "wrk failed (exit $rc):"
        sed 's/^/    /' "$out" >&2
        return 1
    fi
}

# run_wrk_fg OUT SECS wrk-args...: run_wrk_bg + wait_wrk.
run_wrk_fg() {
    local out="$1"
    run_wrk_bg "$@"
    wait_wrk "$WRK_PID" "$out"
}

# commit_desc: short commit, marked when the tracked tree is modified.
commit_desc() {
    local commit
    commit="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    if [[ "$commit" != unknown ]] && [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
        commit="$commit (working tree modified)"
    fi
    echo "$commit"
}
