# Eddy's image: the coordinator, the worker, the CLI and the demo's tools (data generator, the
# external system's stand-in), with the shipped job specs in /opt/eddy.
#
#   docker build -t eddy .                      # builds Eddy from source (a Rust image)
#   docker build --target prebuilt --build-arg BASE=my/debian:bookworm \
#     --build-arg BIN=path/to/release -t eddy . # binaries built beforehand, any Debian 12 base
#
# The `prebuilt` target comes first so that Docker's classic builder, which builds every stage
# before the target, never reaches the Rust stage: machines that reach no registry but Debian's
# build it on a base image of their own.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS runtime-base
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ca-certificates curl libcurl4 libstdc++6 zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /var/lib/eddy eddy \
    && install -d -o eddy -g eddy /var/lib/eddy/data /var/lib/eddy/files
COPY jobs/specs /opt/eddy/specs
COPY sql /opt/eddy/sql
ENV EDDY_ALLOW_DIRS=/var/lib/eddy/files
WORKDIR /var/lib/eddy

FROM runtime-base AS prebuilt
ARG BIN=target/release
COPY ${BIN}/eddy ${BIN}/eddy-coordinator ${BIN}/eddy-worker ${BIN}/eddy-datagen ${BIN}/eddy-mock-api /usr/local/bin/
USER eddy

FROM rust:1-bookworm AS build
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends cmake libclang-dev libcurl4-openssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --workspace --bins \
    && mkdir /out \
    && cp target/release/eddy target/release/eddy-coordinator target/release/eddy-worker target/release/eddy-datagen target/release/eddy-mock-api /out/

FROM runtime-base AS runtime
COPY --from=build /out/ /usr/local/bin/
USER eddy
