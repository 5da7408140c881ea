#!/usr/bin/env bash
# Run tierd locally in front of a Redis on 127.0.0.1:6379.
#
# Installs redis-server/redis-tools with apt when missing, starts a throwaway
# redis-server on 6379 when nothing answers PING there (no persistence; pid and
# log under target/dev/), builds tierd in release mode and runs it with
# proxy.toml. Extra arguments go to tierd, e.g. `scripts/dev.sh --log-level debug`.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! has redis-server || ! has redis-cli; then
	echo "dev.sh: installing redis-server redis-tools"
	as_root apt-get update
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server redis-tools
fi

pong=$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null || true)
if [ "$pong" = PONG ]; then
	echo "dev.sh: using the Redis already answering on 127.0.0.1:6379"
elif [ -n "$pong" ]; then
	# Something is there but will not PING (AUTH required, say). Starting
	# another server on the same port would fail, so use it as it is.
	echo "dev.sh: 127.0.0.1:6379 answered '$pong'; using it as it is" >&2
else
	dev_dir=$PWD/target/dev
	mkdir -p "$dev_dir"
	redis-server --bind 127.0.0.1 --port 6379 --daemonize yes \
		--save '' --appendonly no --dir "$dev_dir" \
		--pidfile "$dev_dir/redis-6379.pid" --logfile "$dev_dir/redis-6379.log"
	deadline=$((SECONDS + 10))
	until [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; do
		if [ "$SECONDS" -ge "$deadline" ]; then
			tail -n 20 "$dev_dir/redis-6379.log" >&2 || true
			echo "dev.sh: redis-server did not answer PING on 127.0.0.1:6379" >&2
			exit 1
		fi
		sleep 0.05
	done
	echo "dev.sh: started redis-server on 127.0.0.1:6379 (no persistence;" \
		"log target/dev/redis-6379.log)"
	echo "dev.sh: it keeps running after tierd exits; stop it with:" \
		"redis-cli -p 6379 shutdown nosave"
fi

cargo build --release --bin tierd

config_args=(--config proxy.toml)
if [ ! -f proxy.toml ]; then
	echo "dev.sh: no proxy.toml at the repository root; using built-in defaults" >&2
	config_args=()
fi

echo
echo "dev.sh: tierd listens on 127.0.0.1:6380 unless proxy.toml or --listen says otherwise."
echo "dev.sh: connect with:  redis-cli -p 6380"
echo
exec target/release/tierd "${config_args[@]}" "$@"
