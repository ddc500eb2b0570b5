#!/usr/bin/env bash
# Builds the images the compose test runs, on a machine that reaches no container registry: a
# Debian 12 base from debootstrap (imported once with `docker import`, then kept), Eddy's image from
# the Dockerfile's `prebuilt` target with the binaries in BIN_DIR, and the stand-ins for the
# third-party services (tests/compose/Dockerfile.services). Docker's layer cache keeps what did not
# change, so a second run rebuilds only the layer of Eddy's binaries.
#
# usage: tests/compose/images.sh BIN_DIR
set -euo pipefail
source "$(dirname "$0")/../../scripts/common.sh"
BIN_DIR=${1:?usage: tests/compose/images.sh BIN_DIR}
BASE=eddy-test/debian:bookworm
WORK=$EDDY_CACHE/compose
mkdir -p "$WORK"

# docker build IMAGE ARGS…, quiet unless it fails (its log is in $WORK/IMAGE.log).
build() {
  local image=$1 log
  shift
  log=$WORK/${image//\//-}.log
  docker build -t "$image:latest" "$@" >"$log" 2>&1 || { tail -n 30 "$log" >&2; echo "building $image failed; see $log" >&2; exit 1; }
}

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap; }
  log "making the base image $BASE with debootstrap (once, about a minute)"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 ||
    { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
  tar -C "$WORK/rootfs" -c . | docker import - "$BASE" >/dev/null
  rm -rf "$WORK/rootfs"
fi

log "building eddy-test/eddy from $BIN_DIR"
rm -rf "$WORK/eddy" && mkdir -p "$WORK/eddy/bin" "$WORK/eddy/jobs"
for b in eddy eddy-coordinator eddy-worker eddy-datagen eddy-mock-api; do
  # Debug builds carry hundreds of MB of debug info that a container does not need.
  objcopy --strip-debug "$BIN_DIR/$b" "$WORK/eddy/bin/$b"
done
cp -r "$ROOT/jobs/specs" "$WORK/eddy/jobs/"
cp -r "$ROOT/sql" "$WORK/eddy/"
build eddy-test/eddy -f "$ROOT/Dockerfile" --target prebuilt --build-arg BASE="$BASE" --build-arg BIN=bin "$WORK/eddy"

log "building the stand-ins for PostgreSQL, Kafka, Redis, ClickHouse and S3"
"$ROOT/scripts/services.sh" install kafka s3 >/dev/null
eval "$("$ROOT/scripts/services.sh" paths)"
rm -rf "$WORK/services" && mkdir -p "$WORK/services/bin"
cp "$ROOT/tests/compose/entrypoint.sh" "$WORK/services/"
cp "$EDDY_TANSU" "$WORK/services/bin/tansu"
cp "$EDDY_S3S" "$WORK/services/bin/s3s-fs"
for target in postgres redis clickhouse kafka s3; do
  build "eddy-test/$target" -f "$ROOT/tests/compose/Dockerfile.services" --target "$target" --build-arg BASE="$BASE" "$WORK/services"
done
log "images ready"
