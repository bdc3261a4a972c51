# Build: docker build -t topicgate .
# Run:   docker run --rm -p 1883:1883 -p 8080:8080 -p 5683:5683/udp -v topicgate-data:/data topicgate
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
RUN cargo build --release --locked --bin topicgate

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin topicgate \
    && mkdir -p /data /etc/topicgate && chown topicgate /data
COPY --from=build /src/target/release/topicgate /usr/local/bin/topicgate
COPY config/topicgate.toml /etc/topicgate/topicgate.toml
USER topicgate
WORKDIR /data
ENV TOPICGATE_CONFIG=/etc/topicgate/topicgate.toml \
    TOPICGATE_DATA_DIR=/data \
    TOPICGATE_LOG_FORMAT=json
EXPOSE 1883/tcp 8080/tcp 5683/udp
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/topicgate"]
