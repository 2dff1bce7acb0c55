#!/usr/bin/env bash
# How far stepgate is from the floor of its own parts: in one run, with the same wrk
# settings and alternating rounds, CPU per request (user and system apart) and req/s of
#   nginx-proxy  nginx proxying to the upstream (keepalive), no checks
#   bare         examples/bare_proxy.rs: hyper 1 + tokio, one event loop per worker,
#                upstream connections pooled per thread, nothing else
#   sg-public    stepgate on a public route (routing, path checks, headers, metrics, logs)
#   sg-key       stepgate on an API-key route (one consumer)
#   sg-banned    stepgate refusing a banned consumer (429 before its code is looked at;
#                nothing forwarded): what each request of a brute-force flood costs
#   nginx-map    nginx with an API-key `map` (what bench/auth.sh calls (b))
# all in front of the same nginx `return 200` upstream. See bench/README.md.
#
#   bench/floor.sh
#   BENCH_ROUNDS=5 BENCH_DURATION=10s bench/floor.sh
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CONNS="${BENCH_CONNS:-64}"
DURATION="${BENCH_DURATION:-5s}"
ROUNDS="${BENCH_ROUNDS:-3}"
WORKERS="${BENCH_WORKERS:-2}"
is_uint "$CONNS" && ((CONNS >= 1)) || die "BENCH_CONNS must be one connection count"
is_uint "$ROUNDS" && ((ROUNDS >= 1 && ROUNDS <= 100)) || die "BENCH_ROUNDS must be 1..100"
is_uint "$WORKERS" && ((WORKERS >= 1 && WORKERS <= 64)) || die "BENCH_WORKERS must be 1..64"
DURATION_S="$(duration_seconds "$DURATION")" || die "BENCH_DURATION must look like 5s"

ensure_tools
bench_setup_work stepgate-floor-bench
build_gateway
log "building examples/bare_proxy.rs"
run_waited bash -c 'cd "$1" && exec cargo build --release --example bare_proxy' bench-build "$ROOT" \
    || die "building the bare proxy failed"
BARE_BIN="$ROOT/target/release/examples/bare_proxy"

start_upstream
log "upstream nginx (pid $NGINX_PID) on 127.0.0.1:$UPSTREAM_PORT"

# ---------------------------------------------------------------- stepgate

GW="$WORK/gateway"
mkdir -p "$GW/policies" "$GW/data"
printf 'api_key: off\nsecond_factor: off\n' >"$GW/policies/public.yaml"
printf 'api_key: required\nsecond_factor: off\n' >"$GW/policies/key.yaml"
printf 'api_key: required\nsecond_factor: required\n' >"$GW/policies/two-factor.yaml"
GATEWAY_PORT="$(free_port)"
ADMIN_PORT="$(free_port)"
{ gateway_yaml_head "$GW"; cat <<EOF; } >"$GW/gateway.yaml"
limits: { workers: $WORKERS }
upstreams:
  nginx: { url: "http://127.0.0.1:$UPSTREAM_PORT" }
routes:
  - { name: public, match: { path: /public }, upstream: nginx, policy: public }
  - { name: key, match: { path: /key }, upstream: nginx, policy: key }
  - { name: two-factor, match: { path: /two-factor }, upstream: nginx, policy: two-factor }
EOF
(cd "$GW" && RUST_LOG=warn exec "$GATEWAY_BIN" run -c "$GW/gateway.yaml" --log-format json) \
    >"$GW/gateway.log" 2>&1 &
GATEWAY_PID=$!
PIDS+=("$GATEWAY_PID")
wait_ready stepgate "$GATEWAY_PID" "$GATEWAY_PORT" "$GW/gateway.log" /public || die "stepgate did not start"
KEY="$(cli consumer add floor | json '["api_key"]')" || die "could not create a consumer"
# A second consumer, enrolled, then banned for wrong codes.
BANNED_KEY="$(cli consumer add banned | json '["api_key"]')" || die "could not create a consumer"
SECRET="$(cli totp enroll banned | json '["secret"]')" || die "could not enrol TOTP"
cli totp confirm banned "$(totp "$SECRET")" >/dev/null || die "could not confirm TOTP"
ban_consumer "$GATEWAY_PORT" /two-factor "$BANNED_KEY" || die "could not ban a consumer"

# ---------------------------------------------------------------- the others

BARE_PORT="$(free_port)"
"$BARE_BIN" "127.0.0.1:$BARE_PORT" "127.0.0.1:$UPSTREAM_PORT" "$WORKERS" >"$WORK/bare.log" 2>&1 &
BARE_PID=$!
PIDS+=("$BARE_PID")
wait_ready bare "$BARE_PID" "$BARE_PORT" "$WORK/bare.log" /public || die "the bare proxy did not start"

proxy_conf() {
    local dir="$1" port="$2"
    nginx_conf_head "$dir"
    echo "http {"
    nginx_http_common "$dir"
    cat <<EOF
    map_hash_bucket_size 128;
    map \$http_x_api_key \$key_ok { default 0; "$KEY" 1; }
    upstream backend { server 127.0.0.1:$UPSTREAM_PORT; keepalive 64; }
    server {
        listen 127.0.0.1:$port;
        location /key {
            if (\$key_ok = 0) { return 401; }
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Api-Key "";
        }
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
}
start_nginx_with "nginx proxy" "$WORK/proxy" proxy_conf /public 200
PROXY_PID="$NGINX_STARTED_PID"
PROXY_PORT="$NGINX_STARTED_PORT"

# name pid port path key
TARGETS=(
    "nginx-proxy $PROXY_PID $PROXY_PORT /public $KEY"
    "bare $BARE_PID $BARE_PORT /public $KEY"
    "sg-public $GATEWAY_PID $GATEWAY_PORT /public $KEY"
    "sg-key $GATEWAY_PID $GATEWAY_PORT /key $KEY"
    "sg-banned $GATEWAY_PID $GATEWAY_PORT /two-factor $BANNED_KEY"
    "nginx-map $PROXY_PID $PROXY_PORT /key $KEY"
)

# user and system ticks (all threads) of PID.
ticks() {
    local stat rest f
    stat="$(<"/proc/$1/stat")"
    rest="${stat##*) }"
    read -ra f <<<"$rest"
    echo "${f[11]} ${f[12]}"
}

RESULTS="$WORK/results.tsv"
: >"$RESULTS"
for t in "${TARGETS[@]}"; do
    read -r name pid port path key <<<"$t"
    run_wrk_fg "$WORK/warmup-$name.txt" 2 -t1 -c"$CONNS" -d2s -H "X-Api-Key: $key" "http://127.0.0.1:$port$path"
done
for ((round = 1; round <= ROUNDS; round++)); do
    for ((k = 0; k < ${#TARGETS[@]}; k++)); do
        read -r name pid port path key <<<"${TARGETS[(k + round - 1) % ${#TARGETS[@]}]}"
        log "round $round/$ROUNDS  $name  c=$CONNS  $DURATION"
        read -r u0 s0 <<<"$(ticks "$pid")"
        out="$WORK/wrk-$name-r$round.txt"
        run_wrk_fg "$out" "$DURATION_S" -t1 -c"$CONNS" -d"$DURATION" --latency \
            -H "X-Api-Key: $key" "http://127.0.0.1:$port$path"
        read -r u1 s1 <<<"$(ticks "$pid")"
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$round" "$((u1 - u0))" "$((s1 - s0))" "$out" >>"$RESULTS"
    done
done

mkdir -p "$RESULTS_DIR"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
REPORT="$RESULTS_DIR/$STAMP-floor.md"
python3 - "$RESULTS" "$CLK_TCK" "$(commit_desc)" "$CONNS" "$DURATION" "$ROUNDS" "$WORKERS" >"$REPORT" <<'PY'
import re, statistics, sys
results, tck, commit, conns, duration, rounds, workers = sys.argv[1:]
tck = int(tck)
rows = {}
for line in open(results):
    name, rnd, ut, st, out = line.rstrip("\n").split("\t")
    text = open(out).read()
    reqs = int(re.search(r"(\d+) requests in", text).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    non = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    rows.setdefault(name, []).append({
        "rps": rps, "user": int(ut) / tck * 1e6 / reqs, "sys": int(st) / tck * 1e6 / reqs,
        # sg-banned should answer nothing but 429: its errors are the answers that were not.
        "errors": (reqs - int(non.group(1) if non else 0)) if name == "sg-banned"
        else int(non.group(1)) if non else 0,
    })
med = {n: {k: statistics.median(r[k] for r in rs) for k in ("rps", "user", "sys")} for n, rs in rows.items()}
for n in med:
    med[n]["total"] = med[n]["user"] + med[n]["sys"]
print(f"# stepgate floor benchmark\n\n- commit: {commit}\n- wrk -t1 -c{conns} -d{duration}, {rounds} rounds (medians), "
      f"{workers} workers for stepgate and the bare proxy; nginx proxies run 1 process\n"
      "- CPU µs/req: the process's utime and stime during the run ÷ requests\n")
print("| target | req/s | user µs/req | system µs/req | total µs/req | total × nginx-proxy | total × bare | errors |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for n in ["nginx-proxy", "bare", "sg-public", "sg-key", "sg-banned", "nginx-map"]:
    m = med[n]
    errors = sum(r["errors"] for r in rows[n])
    print(f"| {n} | {m['rps']:.0f} | {m['user']:.1f} | {m['sys']:.1f} | {m['total']:.1f} | "
          f"{m['total'] / med['nginx-proxy']['total']:.2f} | {m['total'] / med['bare']['total']:.2f} | {errors} |")
print("\nstepgate above the bare proxy (user µs/req): public route "
      f"{med['sg-public']['user'] - med['bare']['user']:.1f}, API-key route {med['sg-key']['user'] - med['bare']['user']:.1f}; "
      f"nginx's API-key map adds {med['nginx-map']['total'] - med['nginx-proxy']['total']:.1f} µs total to its proxy.")
print(f"\nA refused request (banned consumer, 429) costs {med['sg-banned']['total'] / med['sg-key']['total']:.2f}× "
      f"the CPU of a forwarded one (sg-key): user {med['sg-banned']['user'] / med['sg-key']['user']:.2f}×, "
      f"system {med['sg-banned']['sys'] / med['sg-key']['sys']:.2f}×. sg-banned errors: answers other than a refusal.")
PY
cat "$REPORT"
log "report written to ${REPORT#"$ROOT"/}"
