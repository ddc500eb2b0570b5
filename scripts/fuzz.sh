#!/usr/bin/env bash
# Fuzzes what Eddy decodes from outside (fuzz/fuzz_targets): exchange frames, pgoutput messages,
# COPY text rows, job specs and JSON rows, each for SECONDS (default 60), with libFuzzer through `cargo fuzz`,
# starting from the seeds in fuzz/corpus. Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
# New inputs go to a scratch corpus (the repository's stays as committed); an input that crashes
# a target is kept in $EDDY_CACHE/fuzz-artifacts/<target>/ and the script fails naming it.
# Installs cargo-fuzz on first use. The test command runs every target for a few seconds.
source "$(dirname "$0")/common.sh"
cd "$ROOT/fuzz"
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(exchange_codec pgoutput copy_text spec json_row)
if ! cargo fuzz --version 2>/dev/null | grep -q '^cargo-fuzz 0.13.2$'; then
  log "installing cargo-fuzz into $EDDY_CACHE/tools"
  cargo install --quiet --locked cargo-fuzz --version 0.13.2 --root "$EDDY_CACHE/tools" --target-dir "$EDDY_CACHE/tools-target"
fi
# libFuzzer's coverage flags are stable rustc flags; without a sanitizer (which needs a nightly
# compiler) it catches panics, overflows (debug assertions are on) and runaway allocations.
fuzz=(cargo fuzz run --sanitizer none --target-dir "$EDDY_CACHE/fuzz-target")
log "building the fuzz targets"
cargo fuzz build --sanitizer none --target-dir "$EDDY_CACHE/fuzz-target" >/dev/null 2>&1 ||
  cargo fuzz build --sanitizer none --target-dir "$EDDY_CACHE/fuzz-target"
scratch=$(mktemp -d "${TMPDIR:-/tmp}/eddy-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
for target in "${targets[@]}"; do
  artifacts=$EDDY_CACHE/fuzz-artifacts/$target
  mkdir -p "$scratch/$target" "$artifacts"
  log "fuzzing $target for ${seconds}s"
  # -rss_limit_mb: a decoder that allocates what a forged length asks fails (without a sanitizer
  # libFuzzer cannot watch single allocations; one beyond memory aborts, which it catches too).
  if ! "${fuzz[@]}" "$target" "$scratch/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=1024 -artifact_prefix="$artifacts/" -print_final_stats=1 \
    >"$scratch/$target.log" 2>&1; then
    tail -40 "$scratch/$target.log" >&2
    echo "fuzz target $target failed; the input is in $artifacts (run it again: cargo fuzz run --sanitizer none $target <file>)" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$scratch/$target.log" | tail -1)
  echo "fuzz_${target}_runs=${runs:-0}"
done
