# Helpers shared by the scripts in this directory. Source it, don't run it:
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck shell=bash

# has CMD: whether CMD is on PATH.
has() { command -v "$1" >/dev/null 2>&1; }

# as_root CMD...: run a command as root, directly when we are root, else
# through sudo; without either, stop the calling script.
as_root() {
	if [ "$(id -u)" -eq 0 ]; then
		"$@"
	elif has sudo; then
		sudo "$@"
	else
		echo "${0##*/}: need root or sudo to run: $*" >&2
		exit 1
	fi
}
