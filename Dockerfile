# The KPI engine's image: built in a Rust image, run in a slim Debian as an unprivileged user.
#   docker build -t kpi-engine .        (deploy/compose builds it for you)
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY tests tests
COPY config config
RUN cargo build --release --locked -p kpi

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/kpi --shell /usr/sbin/nologin kpi \
 && mkdir -p /var/lib/kpi /etc/kpi \
 && chown kpi:kpi /var/lib/kpi
COPY --from=build /src/target/release/kpi /usr/local/bin/kpi
COPY examples /usr/share/kpi/examples
USER kpi
WORKDIR /var/lib/kpi
EXPOSE 9464
VOLUME ["/var/lib/kpi"]
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
  CMD curl -fsS http://127.0.0.1:9464/readyz || exit 1
ENTRYPOINT ["kpi"]
CMD ["serve", "--config", "/etc/kpi/kpi.toml"]
