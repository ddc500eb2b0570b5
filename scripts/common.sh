# Shared by the scripts: caches outside the checkout, so a fresh clone reuses earlier builds.
# shellcheck shell=bash
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export EDDY_CACHE=${EDDY_CACHE:-$HOME/.cache/eddy}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$EDDY_CACHE/target}
export PATH=$HOME/.cargo/bin:$EDDY_CACHE/tools/bin:$PATH
mkdir -p "$EDDY_CACHE"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Builds the binaries with the given cargo profile (debug or release) and prints their directory.
build_bins() {
  local profile=${1:-debug}
  shift || true
  if [ "$profile" = release ]; then
    (cd "$ROOT" && cargo build --quiet --release --workspace --bins "$@") >&2
  else
    (cd "$ROOT" && cargo build --quiet --workspace --bins "$@") >&2
  fi
  echo "$CARGO_TARGET_DIR/$profile"
}

# Builds the workspace's own crates with clippy's lints, its warnings errors: clippy-driver wraps
# rustc for them (dependencies are built by rustc as usual), so one debug build serves the lints,
# the binaries and the tests (`cargo clippy` checks into a tree of its own, which would compile
# RocksDB's C++ a second time). The test command and the benchmarks that reuse its debug build
# (chaos, failover) call it, so they share that build.
lint_while_building() {
  if command -v rustup >/dev/null; then
    rustup component add clippy rustfmt >/dev/null 2>&1 || true
  fi
  RUSTC_WORKSPACE_WRAPPER=$(command -v clippy-driver) || { echo "clippy-driver is missing: rustup component add clippy" >&2; exit 1; }
  export RUSTC_WORKSPACE_WRAPPER CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
}

# A free TCP port on loopback.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits until `eddy workers` lists $1 alive workers.
wait_workers() {
  local want=$1 i
  for i in $(seq 1 100); do
    if [ "$("$BIN/eddy" workers --json 2>/dev/null | python3 -c 'import json,sys; print(sum(w["state"]=="alive" for w in json.load(sys.stdin)))' 2>/dev/null)" = "$want" ]; then
      return 0
    fi
    sleep 0.1
  done
  echo "workers did not register; see the logs in $RUN_DIR" >&2
  return 1
}

# Waits until job $1 reaches state $2 (or fails), up to $3 seconds.
wait_job() {
  local job=$1 want=$2 limit=${3:-600} state i
  for i in $(seq 1 $((limit * 10))); do
    state=$("$BIN/eddy" status "$job" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
    [ "$state" = "$want" ] && return 0
    case $state in failed|cancelled) echo "job $job is $state:" >&2; "$BIN/eddy" status "$job" >&2; return 1;; esac
    sleep 0.1
  done
  echo "job $job did not become $want within ${limit}s" >&2
  return 1
}

# CPU seconds (user + system) a process has used so far.
cpu_seconds() {
  python3 - "$1" <<'PY'
import os, sys
f = open(f"/proc/{sys.argv[1]}/stat").read().rsplit(")", 1)[1].split()
print((int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"))
PY
}

# Peak resident memory of a process, in MB.
peak_rss_mb() {
  awk '/VmHWM/ {printf "%.1f\n", $2 / 1024}' "/proc/$1/status"
}

# Starts replicated coordinator $1 of $PEERS (ID=HOST:PORT,...) with its data in $RUN_DIR and the
# checkpoints shared; its pid goes to $RUN_DIR/coordinator$1.pid.
start_coordinator() {
  local id=$1 listen
  listen=$(tr ',' '\n' <<<"$PEERS" | sed -n "s/^$id=//p")
  RUST_LOG=warn "$BIN/eddy-coordinator" --listen "$listen" --raft-id "$id" --raft-peers "$PEERS" \
    --data-dir "$RUN_DIR/coordinator$id" --checkpoint-dir "$RUN_DIR/checkpoints" >>"$RUN_DIR/coordinator$id.log" 2>&1 &
  echo $! >"$RUN_DIR/coordinator$id.pid"
}
