# Multi-stage build of the agent image: `docker build -t sluice .`
#
# Stage 1 builds the eBPF object (nightly, rust-src, bpf-linker) and the
# agent; stage 2 is a small Debian with the binary and CA certificates
# (for the Kubernetes API) only. It writes nothing to its root filesystem
# and needs no capability but CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON:
#
#   docker run --network host --cap-drop ALL \
#     --cap-add BPF --cap-add NET_ADMIN --cap-add PERFMON \
#     --security-opt no-new-privileges --read-only \
#     -v /sys/fs/bpf:/sys/fs/bpf -v /etc/sluice:/etc/sluice:ro sluice
#
# The DaemonSet mounts bpffs with a busybox init container, not this image.

FROM rust:1.95-bookworm AS build
# A dated nightly: bpf-linker 0.10.3 links LLVM 22, as this nightly does.
# build.rs runs `rustup run nightly`, so it is linked under that name.
RUN rustup toolchain install nightly-2026-05-19 --profile minimal --component rust-src \
 && rustup toolchain link nightly "$(rustup run nightly-2026-05-19 rustc --print sysroot)" \
 && cargo install bpf-linker@0.10.3 --locked
WORKDIR /src
COPY . .
# .git is not copied: the commit that --version and sluice_build_info name
# comes in as --build-arg SLUICE_COMMIT=$(git rev-parse --short=12 HEAD).
ARG SLUICE_COMMIT=unknown
RUN cargo build --release --locked -p sluice \
 && install -m 0755 target/release/sluice /usr/local/bin/sluice

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/sluice /usr/local/bin/sluice
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/sluice"]
# A wildcard so a published port reaches /metrics, /healthz and /readyz; the
# API answers loopback connections only (see the README's "Exposure"). The
# Kubernetes manifests bind the pod address instead.
CMD ["run", "--config", "/etc/sluice/sluice.yaml", "--listen", "0.0.0.0:9464"]
