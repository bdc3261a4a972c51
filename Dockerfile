# Build: docker build -t topicgate .
# Run:   docker run --rm -p 1883:1883 -p 8080:8080 -p 5683:5683/udp -p 5684:5684/udp -v topicgate-data:/data topicgate
# The image's config (config/docker.toml) binds every interface on purpose: -p decides what the
# host exposes. Mount your own with [auth] before exposing it beyond your machine.
FROM rust:1-bookworm AS build
# CoAP over DTLS builds the Mbed TLS it vendors (cmake, ninja) and its bindings (clang).
RUN apt-get update && apt-get install -y --no-install-recommends cmake ninja-build clang \
    libclang-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
COPY src ./src
COPY config ./config
# `bench` is a workspace member: cargo loads its manifest even when building the gateway alone.
COPY bench ./bench
RUN cargo build --release --locked --bin topicgate

FROM debian:bookworm-slim
# No runtime packages: Mbed TLS is linked in statically.
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin topicgate \
    && mkdir -p /data /etc/topicgate && chown topicgate /data
COPY --from=build /src/target/release/topicgate /usr/local/bin/topicgate
COPY config/docker.toml /etc/topicgate/topicgate.toml
USER topicgate
WORKDIR /data
ENV TOPICGATE_CONFIG=/etc/topicgate/topicgate.toml \
    TOPICGATE_DATA_DIR=/data \
    TOPICGATE_LOG_FORMAT=json
EXPOSE 1883/tcp 8080/tcp 5683/udp 5684/udp
# The binary checks itself: GET /healthz on the configured HTTP listener (no curl in the image).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/topicgate", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/topicgate"]
