#!/usr/bin/env bash
# Runs every test: unit and property tests of each crate, then the end-to-end tests, which start the
# real coordinator, workers and CLI on loopback against real PostgreSQL, a Kafka-protocol broker,
# Redis and ClickHouse. On a fresh machine it first installs what is missing (Debian packages, the
# tansu broker); builds and tools live in $HOME/.cache/eddy, outside the checkout.
source "$(dirname "$0")/common.sh"
cd "$ROOT"
command -v cargo >/dev/null || { echo "cargo is missing: install Rust (https://rustup.rs) first" >&2; exit 1; }
log "checking the house rules: no modules importing each other in a circle, the code formatted"
lint_while_building  # also installs rustfmt and clippy where rustup's minimal profile left them out
python3 scripts/check_modules.py --self-test >/dev/null
python3 scripts/check_modules.py worker/src coordinator/src jobs/src proto/src cli/src
cargo fmt --all --check || { echo "the code is not formatted as rustfmt.toml says: run cargo fmt --all" >&2; exit 1; }
log "starting services (installs them, and the tools only tests use, when missing)"
scripts/services.sh test-tools
scripts/services.sh start
eval "$(scripts/services.sh env)"
# What the connector and tool integration tests talk to (they skip when these are unset).
export EDDY_TEST_REDIS_URL=$EDDY_REDIS_URL EDDY_TEST_CLICKHOUSE_URL=$EDDY_CLICKHOUSE_URL EDDY_TEST_PG_URL=$EDDY_PG_URL
export EDDY_TEST_KAFKA_BROKERS=$EDDY_KAFKA_BROKERS
# Every service is up: a connector test that finds its setting missing fails instead of skipping.
export EDDY_TEST_REQUIRE_SERVICES=1
export EDDY_TEST_SERVICES_CTL=$ROOT/scripts/services.sh
log "building binaries and tests, linted by clippy (its warnings are errors; see lint_while_building)"
# With the tests, so that dependencies are built with the features `cargo test` unifies (its
# dev-dependencies add some): RocksDB is compiled once, not once for the binaries and again for
# the tests.
build_bins debug --tests >/dev/null
log "running tests"
# Among them the short chaos run (tests/chaos.rs: about 40 s of writers under worker kills, a
# coordinator kill, a PostgreSQL restart and outages; its seed is printed). `scripts/bench.sh chaos`
# runs the long one.
cargo test --workspace --no-fail-fast "$@"
log "fuzzing each decoder of outside input briefly (scripts/fuzz.sh SECONDS for longer runs)"
scripts/fuzz.sh 5
