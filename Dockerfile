# Multi-stage build: the release binary on a slim Debian, running as non-root (libssl3:
# librdkafka links OpenSSL for Kafka TLS). Port 9187: /healthz, /readyz, /metrics when
# http.listen is set.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin outbox-relay

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home relay
COPY --from=build /src/target/release/outbox-relay /usr/local/bin/outbox-relay
COPY config/ /etc/outbox-relay/
EXPOSE 9187
USER 10001
ENTRYPOINT ["outbox-relay"]
CMD ["--config", "/etc/outbox-relay/stdout.toml", "run"]
