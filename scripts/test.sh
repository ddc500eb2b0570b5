#!/usr/bin/env bash
# Runs every test: unit and property tests of each crate, then the end-to-end tests, which start the
# real coordinator, workers and CLI on loopback. Builds into $HOME/.cache/eddy, outside the checkout.
source "$(dirname "$0")/common.sh"
cd "$ROOT"
command -v cargo >/dev/null || { echo "cargo is missing: install Rust (https://rustup.rs) first" >&2; exit 1; }
log "building binaries"
build_bins debug >/dev/null
log "running tests"
cargo test --workspace --no-fail-fast "$@"
