#!/usr/bin/env bash
# Side-by-side throughput and latency: Redis directly, twemproxy (Debian's
# nutcracker) and tierd, all in front of the same Redis, in one run.
#
# The script starts its own redis-server, nutcracker and tierd on free loopback
# ports, waits until each answers PING, prefills the keyspace, and then runs
# redis-benchmark for GET and SET at -P 1 and -P 16 with 50 clients. Targets are
# interleaved per case (direct, twemproxy, tierd; next case; ...) and the whole
# matrix is repeated BENCH_ROUNDS times, so slow drift on a small shared machine
# hits every target alike. The table reports the per-column median over rounds.
#
# Output: a markdown table on stdout, also written to target/bench/latest.md.
#
# Environment (defaults in brackets):
#   BENCH_TARGETS         targets to run, any of: direct twemproxy tierd [all three]
#   BENCH_N               requests per run at -P 1 [200000]
#   BENCH_N_PIPELINED     requests per run at -P > 1 [10 x BENCH_N]
#   BENCH_ROUNDS          rounds; the table shows medians [3]
#   BENCH_CLIENTS         redis-benchmark -c [50]
#   BENCH_PIPELINES       pipeline depths to run [1 16]
#   BENCH_KEYSPACE        redis-benchmark -r, prefilled before the runs [10000]
#   BENCH_DATA_SIZE       redis-benchmark -d, bytes per value [64]
#   BENCH_TWEMPROXY_CONNS twemproxy server_connections [1]
#   BENCH_TASKSET=1       pin redis-server to CPU 0 and the proxy to CPU 1
#                         (redis-benchmark stays unpinned) [off]
#   TIERD_BIN             use this tierd binary instead of building
#                         target/release/tierd
#   BENCH_TIERD_CONFIG    pass --config FILE to tierd [none: built-in defaults,
#                         so no [[rules]] and no caching]
#   BENCH_KEEP=1          keep the scratch directory (configs, logs, raw CSV)
#
# twemproxy settings: one pool with one server, `redis: true`, and
# `server_connections: 1`, twemproxy's default and its documented recommendation:
# it multiplexes and pipelines every client's requests over that one connection,
# which is also what a proxy with a pipelined upstream pool does. Raise it with
# BENCH_TWEMPROXY_CONNS to compare other settings.
#
# On a 2-core box redis-server, the proxy and redis-benchmark compete for CPU, so
# absolute numbers are low and proxied numbers are bounded by that contention.
# Compare ratios from the same run, never numbers across machines.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

# nutcracker lives in /usr/sbin, which a non-root PATH may lack.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" ;; esac

BENCH_TARGETS=${BENCH_TARGETS:-direct twemproxy tierd}
BENCH_N=${BENCH_N:-200000}
BENCH_N_PIPELINED=${BENCH_N_PIPELINED:-$((BENCH_N * 10))}
BENCH_ROUNDS=${BENCH_ROUNDS:-3}
BENCH_CLIENTS=${BENCH_CLIENTS:-50}
BENCH_PIPELINES=${BENCH_PIPELINES:-1 16}
BENCH_KEYSPACE=${BENCH_KEYSPACE:-10000}
BENCH_DATA_SIZE=${BENCH_DATA_SIZE:-64}
BENCH_TWEMPROXY_CONNS=${BENCH_TWEMPROXY_CONNS:-1}
BENCH_TASKSET=${BENCH_TASKSET:-0}
BENCH_TIERD_CONFIG=${BENCH_TIERD_CONFIG:-}
BENCH_KEEP=${BENCH_KEEP:-0}
TIERD_BIN=${TIERD_BIN:-}

TESTS="GET SET"

die() {
	echo "bench: $*" >&2
	exit 1
}

log() { echo "bench: $*" >&2; }

# --- arguments -------------------------------------------------------------

for t in $BENCH_TARGETS; do
	case "$t" in
	direct | twemproxy | tierd) ;;
	*) die "unknown target '$t' in BENCH_TARGETS (use: direct twemproxy tierd)" ;;
	esac
done
want() { case " $BENCH_TARGETS " in *" $1 "*) return 0 ;; *) return 1 ;; esac }
[ "$BENCH_ROUNDS" -ge 1 ] 2>/dev/null || die "BENCH_ROUNDS must be a positive integer"

# --- tools -----------------------------------------------------------------

need_pkgs=()
{ has redis-server; } || need_pkgs+=(redis-server)
{ has redis-cli && has redis-benchmark; } || need_pkgs+=(redis-tools)
if want twemproxy && ! has nutcracker; then need_pkgs+=(nutcracker); fi
if [ "${#need_pkgs[@]}" -gt 0 ]; then
	log "installing ${need_pkgs[*]}"
	as_root apt-get update
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_pkgs[@]}"
fi
if [ "$BENCH_TASKSET" = 1 ] && ! has taskset; then
	die "BENCH_TASKSET=1 needs taskset (util-linux)"
fi

if want tierd; then
	if [ -z "$TIERD_BIN" ]; then
		log "building tierd (release)"
		cargo build --release --bin tierd >&2
		TIERD_BIN=$ROOT/target/release/tierd
	fi
	[ -x "$TIERD_BIN" ] || die "tierd binary not found at $TIERD_BIN"
	case "$TIERD_BIN" in /*) ;; *) TIERD_BIN=$ROOT/$TIERD_BIN ;; esac
fi

# --- processes and cleanup -------------------------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tierd-bench.XXXXXX")
PIDS=()

cleanup() {
	local status=$?
	local pid
	for pid in "${PIDS[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in "${PIDS[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	if [ "$status" -ne 0 ] || [ "$BENCH_KEEP" = 1 ]; then
		log "scratch directory kept: $WORK"
	else
		rm -rf "$WORK"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

USED_PORTS=" "
# Sets PORT to a loopback port nothing answers on, below Linux's ephemeral range.
free_port() {
	local p _
	for _ in $(seq 1 500); do
		p=$((20000 + RANDOM % 12000))
		case "$USED_PORTS" in *" $p "*) continue ;; esac
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
			USED_PORTS+="$p "
			PORT=$p
			return 0
		fi
	done
	die "no free loopback port found"
}

# start NAME CPU CMD...: run CMD in the background, logging to $WORK/NAME.log;
# sets PID. CPU is only used with BENCH_TASKSET=1.
start() {
	local name=$1 cpu=$2
	shift 2
	if [ "$BENCH_TASKSET" = 1 ]; then
		set -- taskset -c "$cpu" "$@"
	fi
	"$@" >"$WORK/$name.log" 2>&1 &
	PID=$!
	PIDS+=("$PID")
}

# wait_ready NAME PORT PID: poll PING until PONG; fail fast if the process died.
wait_ready() {
	local name=$1 port=$2 pid=$3
	local deadline=$((SECONDS + 30))
	until [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; do
		if ! kill -0 "$pid" 2>/dev/null; then
			tail -n 20 "$WORK/$name.log" >&2 || true
			die "$name exited before answering PING on 127.0.0.1:$port"
		fi
		if [ "$SECONDS" -ge "$deadline" ]; then
			tail -n 20 "$WORK/$name.log" >&2 || true
			die "$name did not answer PING on 127.0.0.1:$port within 30s"
		fi
		sleep 0.05
	done
}

declare -A TARGET_PORT
declare -A TARGET_PID

free_port
REDIS_PORT=$PORT
start redis 0 redis-server --bind 127.0.0.1 --port "$REDIS_PORT" \
	--save '' --appendonly no --dir "$WORK" --logfile ''
wait_ready redis "$REDIS_PORT" "$PID"
REDIS_PID=$PID
TARGET_PORT[direct]=$REDIS_PORT
log "redis-server on 127.0.0.1:$REDIS_PORT"

if want twemproxy; then
	free_port
	TW_PORT=$PORT
	free_port
	TW_STATS_PORT=$PORT
	cat >"$WORK/nutcracker.yml" <<EOF
bench:
  listen: 127.0.0.1:$TW_PORT
  redis: true
  hash: fnv1a_64
  distribution: ketama
  auto_eject_hosts: false
  preconnect: true
  server_connections: $BENCH_TWEMPROXY_CONNS
  servers:
   - 127.0.0.1:$REDIS_PORT:1
EOF
	nutcracker -t -c "$WORK/nutcracker.yml" >"$WORK/nutcracker-check.log" 2>&1 ||
		{ cat "$WORK/nutcracker-check.log" >&2; die "nutcracker rejected its config"; }
	start twemproxy 1 nutcracker -c "$WORK/nutcracker.yml" -v 4 \
		-o "$WORK/twemproxy.log" -p "$WORK/nutcracker.pid" \
		-s "$TW_STATS_PORT" -a 127.0.0.1
	wait_ready twemproxy "$TW_PORT" "$PID"
	TARGET_PORT[twemproxy]=$TW_PORT
	TARGET_PID[twemproxy]=$PID
	log "nutcracker on 127.0.0.1:$TW_PORT (server_connections: $BENCH_TWEMPROXY_CONNS)"
fi

if want tierd; then
	free_port
	TIERD_PORT=$PORT
	tierd_args=(--listen "127.0.0.1:$TIERD_PORT" --upstream "redis://127.0.0.1:$REDIS_PORT" --log-level warn)
	if [ -n "$BENCH_TIERD_CONFIG" ]; then
		tierd_args=(--config "$(realpath "$BENCH_TIERD_CONFIG")" "${tierd_args[@]}")
	fi
	# Start from the scratch directory so no ./proxy.toml can be picked up.
	if [ "$BENCH_TASKSET" = 1 ]; then
		(cd "$WORK" && exec taskset -c 1 "$TIERD_BIN" "${tierd_args[@]}") >"$WORK/tierd.log" 2>&1 &
	else
		(cd "$WORK" && exec "$TIERD_BIN" "${tierd_args[@]}") >"$WORK/tierd.log" 2>&1 &
	fi
	PID=$!
	PIDS+=("$PID")
	wait_ready tierd "$TIERD_PORT" "$PID"
	TARGET_PORT[tierd]=$TIERD_PORT
	TARGET_PID[tierd]=$PID
	log "tierd on 127.0.0.1:$TIERD_PORT"
fi

# --- prefill ---------------------------------------------------------------

# redis-benchmark -r N uses keys key:000000000000 .. key:{N-1, 12 digits}.
# Prefill them all so GETs are hits from the first request.
awk -v n="$BENCH_KEYSPACE" -v d="$BENCH_DATA_SIZE" 'BEGIN {
	v = ""; for (i = 0; i < d; i++) v = v "x"
	for (i = 0; i < n; i++) {
		k = sprintf("key:%012d", i)
		printf "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", length(k), k, d, v
	}
}' | redis-cli -h 127.0.0.1 -p "$REDIS_PORT" --pipe >"$WORK/prefill.log" 2>&1 ||
	{ cat "$WORK/prefill.log" >&2; die "prefill failed"; }

# --- runs ------------------------------------------------------------------

# CPU time a process has used so far, in clock ticks (utime + stime).
cpu_ticks() {
	if [ -n "$1" ] && [ -r "/proc/$1/stat" ]; then
		# The command name (field 2) may contain spaces: count from the ")".
		sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
	else
		echo 0
	fi
}
CLK_TCK=$(getconf CLK_TCK)

# bench_once TARGET TEST PIPELINE N: prints "rps p50 p99 client_us redis_us
# proxy_us" from redis-benchmark's CSV ("test","rps","avg_latency_ms",
# "min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms",
# "max_latency_ms") and the CPU each process spent per request (microseconds).
# The CPU figures say where the machine's two cores went, which throughput
# alone cannot: when redis-benchmark itself uses a whole core, no target can
# go faster than it.
bench_once() {
	local target=$1 test=$2 pipeline=$3 n=$4 out port times
	port=${TARGET_PORT[$target]}
	local proxy_pid=${TARGET_PID[$target]:-}
	local r0 p0 r1 p1
	r0=$(cpu_ticks "$REDIS_PID")
	p0=$(cpu_ticks "$proxy_pid")
	times=$({ TIMEFORMAT='%U %S'; time redis-benchmark -h 127.0.0.1 -p "$port" -t "${test,,}" \
		-c "$BENCH_CLIENTS" -n "$n" -P "$pipeline" -r "$BENCH_KEYSPACE" -d "$BENCH_DATA_SIZE" \
		--csv >"$WORK/once.csv" 2>>"$WORK/redis-benchmark.err"; } 2>&1) ||
		{ tail -n 20 "$WORK/redis-benchmark.err" >&2; die "redis-benchmark failed on port $port"; }
	r1=$(cpu_ticks "$REDIS_PID")
	p1=$(cpu_ticks "$proxy_pid")
	out=$(cat "$WORK/once.csv")
	echo "$out" >>"$WORK/raw.csv"
	echo "$out" | awk -F'"' -v n="$n" -v t="$times" -v hz="$CLK_TCK" \
		-v r="$((r1 - r0))" -v p="$((p1 - p0))" '
		NR > 1 && $4 != "" {
			split(t, c, " ")
			printf "%s %s %s %.2f %.2f %.2f\n", $4, $10, $14, \
				(c[1] + c[2]) * 1e6 / n, r * 1e6 / hz / n, p * 1e6 / hz / n
			found = 1
		}
		END { if (!found) exit 1 }' ||
		{ tail -n 20 "$WORK/redis-benchmark.err" >&2; die "no result from redis-benchmark on port $port"; }
}

# Warm every target once (connections, allocator, page cache) before measuring.
for t in $BENCH_TARGETS; do
	bench_once "$t" GET 1 20000 >/dev/null
done

RESULTS=$WORK/results.tsv
: >"$RESULTS"
CASES=()
for p in $BENCH_PIPELINES; do
	for test in $TESTS; do
		CASES+=("$test:$p")
	done
done

for round in $(seq 1 "$BENCH_ROUNDS"); do
	for c in "${CASES[@]}"; do
		test=${c%%:*}
		p=${c#*:}
		if [ "$p" -gt 1 ]; then n=$BENCH_N_PIPELINED; else n=$BENCH_N; fi
		for t in $BENCH_TARGETS; do
			res=$(bench_once "$t" "$test" "$p" "$n")
			read -r rps p50 p99 cus rus pus <<<"$res"
			printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$t" "$rps" "$p50" "$p99" \
				"$cus" "$rus" "$pus" >>"$RESULTS"
			log "round $round/$BENCH_ROUNDS  $test -P $p  $t: $rps rps, p50 $p50 ms, p99 $p99 ms, CPU µs/req client $cus redis $rus proxy $pus"
		done
	done
done

# --- report ----------------------------------------------------------------

# median CASE TARGET COLUMN (3 = rps, 4 = p50, 5 = p99, 6-8 = CPU µs per
# request of redis-benchmark, redis-server and the proxy)
median() {
	awk -F'\t' -v c="$1" -v t="$2" -v col="$3" '$1 == c && $2 == t { print $col }' "$RESULTS" |
		sort -g |
		awk '{ a[NR] = $1 } END {
			if (NR == 0) exit 1
			if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2
		}'
}

ratio() {
	awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "–"; else printf "%.2f", a / b }'
}

rev=$(git rev-parse --short HEAD 2>/dev/null) || rev="uncommitted"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then rev="$rev-dirty"; fi
redis_version=$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')

report() {
	echo "# tierd benchmark, $(date -u +%F), rev $rev"
	echo
	local setup
	setup="redis-benchmark -c $BENCH_CLIENTS -r $BENCH_KEYSPACE -d $BENCH_DATA_SIZE"
	setup+=", -n $BENCH_N at -P 1 and $BENCH_N_PIPELINED when pipelined"
	setup+="; median of $BENCH_ROUNDS rounds; $(nproc) CPUs; redis-server $redis_version"
	if want twemproxy; then
		setup+="; nutcracker $(nutcracker -V 2>&1 | sed -n 's/.*nutcracker-//p')"
		setup+=" (server_connections: $BENCH_TWEMPROXY_CONNS)"
	fi
	if [ "$BENCH_TASKSET" = 1 ]; then setup+="; redis-server on CPU 0, proxies on CPU 1"; fi
	echo "$setup."
	echo
	echo "| case | target | rps | p50 ms | p99 ms | CPU µs/req: client | redis | proxy |"
	echo "|---|---|---:|---:|---:|---:|---:|---:|"
	local c t rps p50 p99 cus rus pus
	for c in "${CASES[@]}"; do
		for t in $BENCH_TARGETS; do
			rps=$(median "$c" "$t" 3)
			p50=$(median "$c" "$t" 4)
			p99=$(median "$c" "$t" 5)
			cus=$(median "$c" "$t" 6)
			rus=$(median "$c" "$t" 7)
			pus=$(median "$c" "$t" 8)
			printf '| %s -P %s | %s | %.0f | %.3f | %.3f | %.2f | %.2f | %.2f |\n' \
				"${c%%:*}" "${c#*:}" "$t" "$rps" "$p50" "$p99" "$cus" "$rus" "$pus"
		done
	done
	echo
	echo "Throughput ratios (median rps; above 1.00 means the first is faster):"
	echo
	echo "| case | tierd/direct | tierd/twemproxy | twemproxy/direct |"
	echo "|---|---:|---:|---:|"
	local d w r
	for c in "${CASES[@]}"; do
		d=""
		w=""
		r=""
		if want direct; then d=$(median "$c" direct 3); fi
		if want twemproxy; then w=$(median "$c" twemproxy 3); fi
		if want tierd; then r=$(median "$c" tierd 3); fi
		printf '| %s -P %s | %s | %s | %s |\n' "${c%%:*}" "${c#*:}" \
			"$(ratio "$r" "$d")" "$(ratio "$r" "$w")" "$(ratio "$w" "$d")"
	done
}

mkdir -p "$ROOT/target/bench"
report | tee "$ROOT/target/bench/latest.md"
log "written to target/bench/latest.md"
