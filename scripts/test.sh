#!/usr/bin/env bash
# The full check, locally and in CI (.ci/run): formatting, clippy with warnings
# as errors, and the test suite.
#
# Integration tests start their own redis-server processes on free loopback
# ports, so Redis's tools must be installed; this script installs them (and
# twemproxy's nutcracker, used by scripts/bench.sh) with apt when any is missing,
# along with redis-py (python3-redis), which tests/info_redis_py.rs runs.
#
# Usage: scripts/test.sh [ARGS...]   ARGS go to `cargo test`, e.g.
#        scripts/test.sh --test passthrough -- --nocapture
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# nutcracker lives in /usr/sbin, which a non-root PATH may lack; cargo may live
# in ~/.cargo/bin on a machine whose shell profile was never sourced.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" ;; esac
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
	PATH="$HOME/.cargo/bin:$PATH"
fi
export PATH

START=$SECONDS

step() {
	echo
	echo "==> $* ($((SECONDS - START))s)"
}

POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_OURS=0
remove_policy_rc() {
	if [ "$POLICY_RC_OURS" = 1 ]; then
		as_root rm -f "$POLICY_RC"
		POLICY_RC_OURS=0
	fi
}

# --- tools -----------------------------------------------------------------

missing=()
for tool in redis-server redis-cli redis-benchmark nutcracker; do
	has "$tool" || missing+=("$tool")
done
# Debian's redis-py goes with Debian's python3, which the test falls back to
# when the python3 first on PATH (pyenv, a venv) cannot import it.
/usr/bin/python3 -c 'import redis' >/dev/null 2>&1 || missing+=(python3-redis)
if [ "${#missing[@]}" -gt 0 ]; then
	step "installing redis-server redis-tools nutcracker python3-redis (missing: ${missing[*]})"
	# The packages' own services (redis-server on 6379, nutcracker) are not
	# needed: tests start their own processes on free ports. Keep apt from
	# starting them with a temporary policy-rc.d, unless the machine already has
	# one, so nothing extra runs beside the tests. Nothing already running is
	# touched.
	if [ ! -e "$POLICY_RC" ]; then
		trap remove_policy_rc EXIT
		printf '#!/bin/sh\nexit 101\n' | as_root tee "$POLICY_RC" >/dev/null
		as_root chmod 755 "$POLICY_RC"
		POLICY_RC_OURS=1
	fi
	as_root apt-get update
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server redis-tools nutcracker python3-redis
	remove_policy_rc
fi
redis-server --version

has cargo || {
	echo "test.sh: cargo not found; install Rust with rustup (https://rustup.rs)" >&2
	exit 1
}
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
	step "rustup component add rustfmt clippy"
	rustup component add rustfmt clippy
fi
cargo --version

# CI builds from scratch once: incremental artifacts only cost time and disk.
if [ -n "${CI:-}" ]; then
	export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
fi
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

# --- checks ----------------------------------------------------------------

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo test $*"
cargo test "$@"

step "all checks passed"
