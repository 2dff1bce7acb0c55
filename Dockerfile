# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run in a slim Debian with only the binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked && strip target/release/stepgate

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/stepgate --create-home stepgate
COPY --from=build /src/target/release/stepgate /usr/local/bin/stepgate
USER 10001:10001
WORKDIR /var/lib/stepgate
ENV STEPGATE_CONFIG=/etc/stepgate/gateway.yaml
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["stepgate", "health"]
ENTRYPOINT ["stepgate"]
CMD ["run", "--log-format", "json"]
