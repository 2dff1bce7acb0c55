# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run in a slim Debian with only the binary.
#
#   docker build -t stepgate:local .        (or: docker compose up --build)
#
# The build context is what .dockerignore lets through: the manifests and the sources below,
# never target/, data/ (master.key, admin.token) or .git. tests/docker_context.rs assembles
# exactly the files these COPY lines give the build stage and runs cargo on them.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Everything cargo reads to build the package: the manifests; src/; assets/, compiled into the
# binary (include_str! of the security page); benches/ and examples/, which the manifest
# declares or cargo discovers, so it refuses to load the package without them (they are not
# built here); testkit/, the tests' helper crate, a workspace member cargo must find.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY assets ./assets
COPY benches ./benches
COPY examples ./examples
COPY testkit ./testkit
# Dependency caching with BuildKit cache mounts rather than a layer of stub sources: the
# crates downloaded and the compiled dependencies stay in the builder's cache across builds
# (also when Cargo.lock changes, where a stub layer would rebuild every dependency), and there
# is no stub of the package's targets to keep in step with Cargo.toml. The target directory
# is a cache, not part of the image, so the binary is copied out of it in the same step.
RUN --mount=type=cache,id=stepgate-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=stepgate-target,target=/src/target,sharing=locked \
    cargo build --release --locked \
 && strip target/release/stepgate \
 && cp target/release/stepgate /usr/local/bin/stepgate

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/stepgate --create-home stepgate
COPY --from=build /usr/local/bin/stepgate /usr/local/bin/stepgate
USER 10001:10001
WORKDIR /var/lib/stepgate
ENV STEPGATE_CONFIG=/etc/stepgate/gateway.yaml
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["stepgate", "health"]
ENTRYPOINT ["stepgate"]
CMD ["run", "--log-format", "json"]
