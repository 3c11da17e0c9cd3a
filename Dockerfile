# Multi-stage build: a static-ish release binary on a slim Debian, running as non-root.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin outbox-relay

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home relay
COPY --from=build /src/target/release/outbox-relay /usr/local/bin/outbox-relay
COPY config/ /etc/outbox-relay/
USER 10001
ENTRYPOINT ["outbox-relay"]
CMD ["--config", "/etc/outbox-relay/stdout.toml", "run"]
