#!/usr/bin/env bash
# Side-by-side throughput and latency: Redis directly, twemproxy (Debian's
# nutcracker) and tierd, all in front of the same Redis, in one run.
#
# The script starts its own redis-server, nutcracker and tierd on free loopback
# ports, waits until each answers PING, prefills the keyspace, and then runs
# redis-benchmark with 50 clients in two suites:
#
#   proxy  GET and SET at -P 1 and -P 16 through tierd with no caching rules
#          (target "tierd"): the cost of the proxy itself.
#   l1     GET, and MGET of BENCH_MGET_KEYS keys, at -P 1 and -P 16 through a
#          second tierd whose rules cache every benchmark key (target
#          "tierd-l1", config scripts/bench-l1.toml). Before each round the
#          script GETs every key through it, twice, and stops unless
#          CACHE.STATS shows the second pass served from L1; the table's
#          "L1 hit rate" column is the lowest hit rate CACHE.STATS counted
#          during a measured run. The other targets run the same cases, so
#          the ratios compare an L1 hit with Redis directly.
#   bus    Not run by default. The invalidation bus between tierd instances:
#          runs `cargo bench --bench bus` (benches/bus.rs), which starts its
#          own redis-server and three tierds and prints its own tables
#          (propagation latency, CACHE.INVALIDATE PATTERN throughput); about
#          15 s plus the build. With other suites, its tables follow theirs.
#   compression
#          Not run by default. Transparent lz4 compression (issue 6): runs
#          `cargo bench --bench compression` (benches/compression.rs), which
#          starts its own redis-server and two tierds, stores 10,000 generated
#          JSON documents of 4-64 KB plain and compressed, and prints its own
#          tables (Redis used_memory, GET throughput from Redis and from L1,
#          L1 bytes per document, codec cost per document size); about 80 s
#          plus the build. With other suites, its tables follow theirs (after
#          bus).
#   stampede
#          Not run by default. Stampede protection (issue 5): runs `cargo
#          bench --bench stampede` (benches/stampede.rs), which starts its own
#          redis-server and three tierds, lets a herd of 150 clients (50 per
#          instance) read each of 1,000 cold keys at once, with the key's rule
#          leasing (`stampede = { lease = "5s", wait = "2s" }`) and without,
#          and prints its own tables (database loads per key, p50/p99 wait,
#          CACHE.STATS lease counters, Redis commands per key); about 60 s
#          plus the build. STAMPEDE_KEYS, STAMPEDE_CLIENTS, STAMPEDE_LOAD_MS
#          and the others at the top of that file pass through. With other
#          suites, its tables follow theirs (after compression).
#   warming
#          Not run by default. Warming (issue 7): runs `cargo bench --bench
#          warming` (benches/warming.rs), which starts its own redis-server
#          with 100,000 keys and tierds in front of it, primes a hot set with
#          one instance under a Zipf(0.99) GET workload, then restarts a
#          fresh instance three times (hot-set warming, pattern warming, no
#          warming) under 5,000 GET/s and prints the hit rate 1, 2, 5, 10, 30
#          and 60 s after each start, and whether the target (>= 80% within
#          10 s with hot-set warming) is met; about 4 minutes plus the build.
#          WARMING_SECS (60; e.g. 10 for a quick run), WARMING_PRIME_SECS,
#          WARMING_RPS, WARMING_LIMIT and the others at the top of that file
#          pass through. With other suites, its tables follow theirs (after
#          stampede).
#
# Targets are interleaved per case (direct, twemproxy, tierd, tierd-l1; next
# case; ...) and all cases are repeated BENCH_ROUNDS times, so slow drift on a
# small shared machine hits every target alike. The tables report per-column
# medians over rounds.
#
# Output: markdown tables on stdout, also written to target/bench/latest.md.
#
# Only the L1 rows:   BENCH_SUITES=l1 scripts/bench.sh
# Only the proxy rows: BENCH_SUITES=proxy scripts/bench.sh
# Only the bus tables: BENCH_SUITES=bus scripts/bench.sh
# Only the compression tables: BENCH_SUITES=compression scripts/bench.sh
# Only the stampede tables: BENCH_SUITES=stampede scripts/bench.sh
# Only the warming tables: BENCH_SUITES=warming scripts/bench.sh
#
# Environment (defaults in brackets):
#   BENCH_SUITES          suites to run, any of: proxy l1 bus compression
#                         stampede warming [proxy l1]
#   BENCH_TARGETS         targets to run, any of: direct twemproxy tierd tierd-l1
#                         [all four]; the proxy suite ignores tierd-l1, the l1
#                         suite needs it
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
#   BENCH_L1_CONFIG       --config FILE for tierd-l1; its rules must cache
#                         key:* [scripts/bench-l1.toml]
#   BENCH_MGET_KEYS       keys per MGET in the l1 suite [10]
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

BENCH_SUITES=${BENCH_SUITES:-proxy l1}
BENCH_TARGETS=${BENCH_TARGETS:-direct twemproxy tierd tierd-l1}
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
BENCH_L1_CONFIG=${BENCH_L1_CONFIG:-scripts/bench-l1.toml}
BENCH_MGET_KEYS=${BENCH_MGET_KEYS:-10}
BENCH_KEEP=${BENCH_KEEP:-0}
TIERD_BIN=${TIERD_BIN:-}

PROXY_TESTS="GET SET"
L1_TESTS="GET MGET"

die() {
	echo "bench: $*" >&2
	exit 1
}

log() { echo "bench: $*" >&2; }

# --- arguments -------------------------------------------------------------

for t in $BENCH_TARGETS; do
	case "$t" in
	direct | twemproxy | tierd | tierd-l1) ;;
	*) die "unknown target '$t' in BENCH_TARGETS (use: direct twemproxy tierd tierd-l1)" ;;
	esac
done
for s in $BENCH_SUITES; do
	case "$s" in
	proxy | l1 | bus | compression | stampede | warming) ;;
	*) die "unknown suite '$s' in BENCH_SUITES (use: proxy l1 bus compression stampede warming)" ;;
	esac
done
want() { case " $BENCH_TARGETS " in *" $1 "*) return 0 ;; *) return 1 ;; esac }
suite() { case " $BENCH_SUITES " in *" $1 "*) return 0 ;; *) return 1 ;; esac }

# cargo_bench_suite BENCH TITLE: a self-contained suite's tables on stdout,
# under a heading with the date and revision. benches/bus.rs,
# benches/compression.rs, benches/stampede.rs and benches/warming.rs each
# start their own redis-server and tierds, so they need nothing the other
# suites set up.
cargo_bench_suite() {
	local bench=$1 title=$2 rev
	rev=$(git rev-parse --short HEAD 2>/dev/null) || rev="uncommitted"
	if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then rev="$rev-dirty"; fi
	log "$bench suite: cargo bench --bench $bench"
	echo "## $title: cargo bench --bench $bench, $(date -u +%F), rev $rev"
	echo
	cargo bench --bench "$bench"
}
# self_contained_suites: the bus, compression, stampede and warming suites,
# in that order, each after a blank line when something was printed before
# it.
self_contained_suites() {
	local sep=${1:-}
	if suite bus; then
		[ -z "$sep" ] || echo
		cargo_bench_suite bus "Invalidation bus"
		sep=1
	fi
	if suite compression; then
		[ -z "$sep" ] || echo
		cargo_bench_suite compression "Transparent compression"
		sep=1
	fi
	if suite stampede; then
		[ -z "$sep" ] || echo
		cargo_bench_suite stampede "Stampede protection"
		sep=1
	fi
	if suite warming; then
		[ -z "$sep" ] || echo
		cargo_bench_suite warming "Warming"
	fi
}
only_self_contained=1
for s in $BENCH_SUITES; do
	case "$s" in bus | compression | stampede | warming) ;; *) only_self_contained=0 ;; esac
done
if [ "$only_self_contained" = 1 ]; then
	mkdir -p "$ROOT/target/bench"
	self_contained_suites | tee "$ROOT/target/bench/latest.md"
	log "written to target/bench/latest.md"
	exit 0
fi

[ "$BENCH_ROUNDS" -ge 1 ] 2>/dev/null || die "BENCH_ROUNDS must be a positive integer"
[ "$BENCH_MGET_KEYS" -ge 1 ] 2>/dev/null || die "BENCH_MGET_KEYS must be a positive integer"

# The targets of each suite, in BENCH_TARGETS order.
PROXY_TARGETS=""
L1_TARGETS=""
for t in $BENCH_TARGETS; do
	if suite proxy && [ "$t" != tierd-l1 ]; then PROXY_TARGETS+="$t "; fi
	if suite l1; then L1_TARGETS+="$t "; fi
done
if suite l1 && ! want tierd-l1; then
	die "the l1 suite needs target tierd-l1 in BENCH_TARGETS (or set BENCH_SUITES=proxy)"
fi
if suite l1; then
	[ -r "$BENCH_L1_CONFIG" ] || die "BENCH_L1_CONFIG: cannot read $BENCH_L1_CONFIG"
	BENCH_L1_CONFIG=$(realpath "$BENCH_L1_CONFIG")
fi
if [ -n "$BENCH_TIERD_CONFIG" ]; then
	[ -r "$BENCH_TIERD_CONFIG" ] || die "BENCH_TIERD_CONFIG: cannot read $BENCH_TIERD_CONFIG"
	BENCH_TIERD_CONFIG=$(realpath "$BENCH_TIERD_CONFIG")
fi
# Only the targets some suite uses are started.
RUN_TARGETS=""
for t in $BENCH_TARGETS; do
	case " $PROXY_TARGETS $L1_TARGETS " in *" $t "*) RUN_TARGETS+="$t " ;; esac
done
run() { case " $RUN_TARGETS " in *" $1 "*) return 0 ;; *) return 1 ;; esac }

# --- tools -----------------------------------------------------------------

need_pkgs=()
{ has redis-server; } || need_pkgs+=(redis-server)
{ has redis-cli && has redis-benchmark; } || need_pkgs+=(redis-tools)
if run twemproxy && ! has nutcracker; then need_pkgs+=(nutcracker); fi
if [ "${#need_pkgs[@]}" -gt 0 ]; then
	log "installing ${need_pkgs[*]}"
	as_root apt-get update
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_pkgs[@]}"
fi
if [ "$BENCH_TASKSET" = 1 ] && ! has taskset; then
	die "BENCH_TASKSET=1 needs taskset (util-linux)"
fi

if run tierd || run tierd-l1; then
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

if run twemproxy; then
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

# start_tierd TARGET [CONFIG]: start a tierd in front of the Redis as TARGET.
start_tierd() {
	local target=$1 config=${2:-} port tierd_args
	free_port
	port=$PORT
	# Two tierds run side by side; neither needs the metrics listener.
	tierd_args=(--listen "127.0.0.1:$port" --upstream "redis://127.0.0.1:$REDIS_PORT" --log-level warn --metrics-listen "")
	if [ -n "$config" ]; then
		tierd_args=(--config "$config" "${tierd_args[@]}")
	fi
	# Start from the scratch directory so no ./proxy.toml can be picked up.
	if [ "$BENCH_TASKSET" = 1 ]; then
		(cd "$WORK" && exec taskset -c 1 "$TIERD_BIN" "${tierd_args[@]}") >"$WORK/$target.log" 2>&1 &
	else
		(cd "$WORK" && exec "$TIERD_BIN" "${tierd_args[@]}") >"$WORK/$target.log" 2>&1 &
	fi
	PID=$!
	PIDS+=("$PID")
	wait_ready "$target" "$port" "$PID"
	TARGET_PORT[$target]=$port
	TARGET_PID[$target]=$PID
	log "$target on 127.0.0.1:$port${config:+ (--config $config)}"
}

if run tierd; then start_tierd tierd "$BENCH_TIERD_CONFIG"; fi
if run tierd-l1; then start_tierd tierd-l1 "$BENCH_L1_CONFIG"; fi

# --- prefill ---------------------------------------------------------------

# redis-benchmark -r N uses keys key:000000000000 .. key:{N-1, 12 digits}.
# Prefill them all so GETs find a value from the first request.
awk -v n="$BENCH_KEYSPACE" -v d="$BENCH_DATA_SIZE" 'BEGIN {
	v = ""; for (i = 0; i < d; i++) v = v "x"
	for (i = 0; i < n; i++) {
		k = sprintf("key:%012d", i)
		printf "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", length(k), k, d, v
	}
}' | redis-cli -h 127.0.0.1 -p "$REDIS_PORT" --pipe >"$WORK/prefill.log" 2>&1 ||
	{ cat "$WORK/prefill.log" >&2; die "prefill failed"; }

# --- L1 warming --------------------------------------------------------------

# l1_counters: "hits misses entries" summed over tierd-l1's rules, from
# CACHE.STATS (per rule a flat array: rule NAME hits N misses N hit_rate "R"
# entries N bytes N evictions N invalidations N; redis-cli prints one element
# per line when its output is not a terminal).
l1_counters() {
	redis-cli -h 127.0.0.1 -p "${TARGET_PORT[tierd-l1]}" CACHE.STATS 2>&1 |
		awk '
			prev == "rule" { prev = ""; next }
			prev != "" { sum[prev] += $1; prev = ""; next }
			$1 == "rule" || $1 == "hits" || $1 == "misses" || $1 == "entries" { prev = $1 }
			END { printf "%d %d %d\n", sum["hits"], sum["misses"], sum["entries"] }'
}

# l1_warm: GET every key through tierd-l1 until a whole pass is served from L1
# (up to 3 passes after the fill); stop the script if it never is. Writes to
# the keys between rounds (the SET rows) invalidate them, so this runs before
# every round of the l1 suite.
l1_warm() {
	local pass h0 m0 h1 m1 e1 rate=0
	for pass in 0 1 2 3; do
		read -r h0 m0 _ <<<"$(l1_counters)"
		awk -v n="$BENCH_KEYSPACE" 'BEGIN {
			for (i = 0; i < n; i++) {
				k = sprintf("key:%012d", i)
				printf "*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n", length(k), k
			}
		}' | redis-cli -h 127.0.0.1 -p "${TARGET_PORT[tierd-l1]}" --pipe >"$WORK/l1-warm.log" 2>&1 ||
			{ cat "$WORK/l1-warm.log" >&2; die "warming tierd-l1 failed"; }
		read -r h1 m1 e1 <<<"$(l1_counters)"
		rate=$(awk -v h="$((h1 - h0))" -v n="$BENCH_KEYSPACE" 'BEGIN { printf "%.4f", h / n }')
		if [ "$pass" -gt 0 ] && awk -v r="$rate" 'BEGIN { exit !(r >= 0.99) }'; then
			return 0
		fi
	done
	redis-cli -h 127.0.0.1 -p "${TARGET_PORT[tierd-l1]}" CACHE.STATS >&2 || true
	die "tierd-l1 served only $rate of a pass of GETs over all $BENCH_KEYSPACE keys from L1 \
($((h1 - h0)) hits, $((m1 - m0)) misses, $e1 entries): is L1 wired into the proxy, and does \
a rule in $BENCH_L1_CONFIG cache key:*?"
}

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

# MGET key:__rand_int__ ... : redis-benchmark replaces each placeholder with
# its own random key, so one request reads BENCH_MGET_KEYS random keys.
MGET_ARGS=(MGET)
for _ in $(seq 1 "$BENCH_MGET_KEYS"); do MGET_ARGS+=("key:__rand_int__"); done

# bench_once TARGET TEST PIPELINE N: prints "rps p50 p99 client_us redis_us
# proxy_us hit_rate" from redis-benchmark's CSV ("test","rps","avg_latency_ms",
# "min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms",
# "max_latency_ms"), the CPU each process spent per request (microseconds),
# and for tierd-l1 the share of L1 lookups that hit during the run ("-"
# elsewhere). The CPU figures say where the machine's two cores went, which
# throughput alone cannot: when redis-benchmark itself uses a whole core, no
# target can go faster than it. TEST is GET, SET (redis-benchmark -t) or MGET.
bench_once() {
	local target=$1 test=$2 pipeline=$3 n=$4 out port times cmd
	port=${TARGET_PORT[$target]}
	local proxy_pid=${TARGET_PID[$target]:-}
	local r0 p0 r1 p1 h0=0 m0=0 h1=0 m1=0 _e hit=-
	case "$test" in
	MGET) cmd=("${MGET_ARGS[@]}") ;;
	*) cmd=(-t "${test,,}") ;;
	esac
	if [ "$target" = tierd-l1 ]; then read -r h0 m0 _e <<<"$(l1_counters)"; fi
	r0=$(cpu_ticks "$REDIS_PID")
	p0=$(cpu_ticks "$proxy_pid")
	times=$({ TIMEFORMAT='%U %S'; time redis-benchmark -h 127.0.0.1 -p "$port" \
		-c "$BENCH_CLIENTS" -n "$n" -P "$pipeline" -r "$BENCH_KEYSPACE" -d "$BENCH_DATA_SIZE" \
		--csv "${cmd[@]}" >"$WORK/once.csv" 2>>"$WORK/redis-benchmark.err"; } 2>&1) ||
		{ tail -n 20 "$WORK/redis-benchmark.err" >&2; die "redis-benchmark failed on port $port"; }
	r1=$(cpu_ticks "$REDIS_PID")
	p1=$(cpu_ticks "$proxy_pid")
	if [ "$target" = tierd-l1 ]; then
		read -r h1 m1 _e <<<"$(l1_counters)"
		hit=$(awk -v h="$((h1 - h0))" -v m="$((m1 - m0))" \
			'BEGIN { if (h + m == 0) print "-"; else printf "%.4f", h / (h + m) }')
	fi
	out=$(cat "$WORK/once.csv")
	echo "$out" >>"$WORK/raw.csv"
	echo "$out" | awk -F'"' -v n="$n" -v t="$times" -v hz="$CLK_TCK" \
		-v r="$((r1 - r0))" -v p="$((p1 - p0))" -v hit="$hit" '
		NR > 1 && $4 != "" {
			split(t, c, " ")
			printf "%s %s %s %.2f %.2f %.2f %s\n", $4, $10, $14, \
				(c[1] + c[2]) * 1e6 / n, r * 1e6 / hz / n, p * 1e6 / hz / n, hit
			found = 1
		}
		END { if (!found) exit 1 }' ||
		{ tail -n 20 "$WORK/redis-benchmark.err" >&2; die "no result from redis-benchmark on port $port"; }
}

# Warm every target once (connections, allocator, page cache) before measuring.
for t in $RUN_TARGETS; do
	bench_once "$t" GET 1 20000 >/dev/null
done

RESULTS=$WORK/results.tsv
: >"$RESULTS"
# Cases are SUITE:TEST:PIPELINE.
PROXY_CASES=()
L1_CASES=()
for p in $BENCH_PIPELINES; do
	if suite proxy; then
		for test in $PROXY_TESTS; do PROXY_CASES+=("proxy:$test:$p"); done
	fi
	if suite l1; then
		for test in $L1_TESTS; do L1_CASES+=("l1:$test:$p"); done
	fi
done

# case_label CASE: "GET -P 16", "MGET 10 keys -P 1".
case_label() {
	local rest=${1#*:}
	local test=${rest%%:*} p=${rest#*:}
	if [ "$test" = MGET ]; then test="MGET $BENCH_MGET_KEYS keys"; fi
	echo "$test -P $p"
}

# run_case CASE TARGETS...: one run of CASE on each target, in order.
run_case() {
	local c=$1 rest test p n t res rps p50 p99 cus rus pus hit hit_note
	shift
	rest=${c#*:}
	test=${rest%%:*}
	p=${rest#*:}
	if [ "$p" -gt 1 ]; then n=$BENCH_N_PIPELINED; else n=$BENCH_N; fi
	for t in "$@"; do
		res=$(bench_once "$t" "$test" "$p" "$n")
		read -r rps p50 p99 cus rus pus hit <<<"$res"
		printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$t" "$rps" "$p50" "$p99" \
			"$cus" "$rus" "$pus" "$hit" >>"$RESULTS"
		if [ "$hit" = - ]; then hit_note=""; else hit_note=", L1 hit rate $hit"; fi
		log "round $round/$BENCH_ROUNDS  $(case_label "$c")  $t: $rps rps, p50 $p50 ms, p99 $p99 ms, CPU µs/req client $cus redis $rus proxy $pus$hit_note"
	done
}

for round in $(seq 1 "$BENCH_ROUNDS"); do
	for c in "${PROXY_CASES[@]}"; do
		# shellcheck disable=SC2086 # target lists are space-separated words
		run_case "$c" $PROXY_TARGETS
	done
	if [ "${#L1_CASES[@]}" -gt 0 ]; then
		l1_warm
		for c in "${L1_CASES[@]}"; do
			# shellcheck disable=SC2086
			run_case "$c" $L1_TARGETS
		done
	fi
done

# --- report ----------------------------------------------------------------

# column CASE TARGET COLUMN: that column of every round (3 = rps, 4 = p50,
# 5 = p99, 6-8 = CPU µs per request of redis-benchmark, redis-server and the
# proxy, 9 = L1 hit rate or "-").
column() {
	awk -F'\t' -v c="$1" -v t="$2" -v col="$3" '$1 == c && $2 == t && $col != "-" { print $col }' "$RESULTS"
}

# median CASE TARGET COLUMN
median() {
	column "$@" | sort -g |
		awk '{ a[NR] = $1 } END {
			if (NR == 0) exit 1
			if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2
		}'
}

# lowest CASE TARGET COLUMN: the smallest value over rounds, or "–".
lowest() {
	column "$@" | sort -g | awk 'NR == 1 { print; found = 1 } END { if (!found) print "–" }'
}

ratio() {
	awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "–"; else printf "%.2f", a / b }'
}

# in_list WORD LIST: whether WORD is one of LIST's words.
in_list() { case " $2 " in *" $1 "*) return 0 ;; *) return 1 ;; esac }

# median_if CASE TARGET TARGETS: the median rps when TARGET ran, else empty.
median_if() {
	if in_list "$2" "$3"; then median "$1" "$2" 3; fi
}

rev=$(git rev-parse --short HEAD 2>/dev/null) || rev="uncommitted"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then rev="$rev-dirty"; fi
redis_version=$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')

# target_rows CASE TARGETS [HIT]: one table row per target; with HIT, an "L1
# hit rate" column (lowest over rounds).
target_rows() {
	local c=$1 targets=$2 with_hit=${3:-} t rps p50 p99 cus rus pus hit
	for t in $targets; do
		rps=$(median "$c" "$t" 3)
		p50=$(median "$c" "$t" 4)
		p99=$(median "$c" "$t" 5)
		cus=$(median "$c" "$t" 6)
		rus=$(median "$c" "$t" 7)
		pus=$(median "$c" "$t" 8)
		printf '| %s | %s | %.0f | %.3f | %.3f | %.2f | %.2f | %.2f |' \
			"$(case_label "$c")" "$t" "$rps" "$p50" "$p99" "$cus" "$rus" "$pus"
		if [ -n "$with_hit" ]; then
			hit=$(lowest "$c" "$t" 9)
			printf ' %s |' "$hit"
		fi
		echo
	done
}

report() {
	echo "# tierd benchmark, $(date -u +%F), rev $rev"
	echo
	local setup
	setup="redis-benchmark -c $BENCH_CLIENTS -r $BENCH_KEYSPACE -d $BENCH_DATA_SIZE"
	setup+=", -n $BENCH_N at -P 1 and $BENCH_N_PIPELINED when pipelined"
	setup+="; median of $BENCH_ROUNDS rounds; $(nproc) CPUs; redis-server $redis_version"
	if run twemproxy; then
		setup+="; nutcracker $(nutcracker -V 2>&1 | sed -n 's/.*nutcracker-//p')"
		setup+=" (server_connections: $BENCH_TWEMPROXY_CONNS)"
	fi
	if [ "$BENCH_TASKSET" = 1 ]; then setup+="; redis-server on CPU 0, proxies on CPU 1"; fi
	echo "$setup."
	local c d w r l
	if [ "${#PROXY_CASES[@]}" -gt 0 ]; then
		echo
		echo "| case | target | rps | p50 ms | p99 ms | CPU µs/req: client | redis | proxy |"
		echo "|---|---|---:|---:|---:|---:|---:|---:|"
		for c in "${PROXY_CASES[@]}"; do
			target_rows "$c" "$PROXY_TARGETS"
		done
		echo
		echo "Throughput ratios (median rps; above 1.00 means the first is faster):"
		echo
		echo "| case | tierd/direct | tierd/twemproxy | twemproxy/direct |"
		echo "|---|---:|---:|---:|"
		for c in "${PROXY_CASES[@]}"; do
			d=$(median_if "$c" direct "$PROXY_TARGETS")
			w=$(median_if "$c" twemproxy "$PROXY_TARGETS")
			r=$(median_if "$c" tierd "$PROXY_TARGETS")
			printf '| %s | %s | %s | %s |\n' "$(case_label "$c")" \
				"$(ratio "$r" "$d")" "$(ratio "$r" "$w")" "$(ratio "$w" "$d")"
		done
	fi
	if [ "${#L1_CASES[@]}" -gt 0 ]; then
		echo
		echo "L1 hits: tierd-l1 runs with --config ${BENCH_L1_CONFIG#"$ROOT"/}, whose rule caches"
		echo "key:*; all $BENCH_KEYSPACE keys were read through it before each round, so every"
		echo "lookup should hit (\"L1 hit rate\": the lowest over rounds, from CACHE.STATS)."
		echo "tierd is the same binary without rules. An MGET is one request."
		echo
		echo "| case | target | rps | p50 ms | p99 ms | CPU µs/req: client | redis | proxy | L1 hit rate |"
		echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
		for c in "${L1_CASES[@]}"; do
			target_rows "$c" "$L1_TARGETS" hit
		done
		echo
		echo "L1 throughput ratios (median rps; above 1.00 means tierd-l1 is faster):"
		echo
		echo "| case | tierd-l1/direct | tierd-l1/twemproxy | tierd-l1/tierd |"
		echo "|---|---:|---:|---:|"
		for c in "${L1_CASES[@]}"; do
			d=$(median_if "$c" direct "$L1_TARGETS")
			w=$(median_if "$c" twemproxy "$L1_TARGETS")
			r=$(median_if "$c" tierd "$L1_TARGETS")
			l=$(median_if "$c" tierd-l1 "$L1_TARGETS")
			printf '| %s | %s | %s | %s |\n' "$(case_label "$c")" \
				"$(ratio "$l" "$d")" "$(ratio "$l" "$w")" "$(ratio "$l" "$r")"
		done
	fi
}

mkdir -p "$ROOT/target/bench"
{
	report
	self_contained_suites 1
} | tee "$ROOT/target/bench/latest.md"
log "written to target/bench/latest.md"
