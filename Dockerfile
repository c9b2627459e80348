# syntax=docker/dockerfile:1
# Both warmroll images from one file:
#   docker build --target agent       -t ghcr.io/warmroll/warmroll-agent:0.1.0 .
#   docker build --target coordinator -t ghcr.io/warmroll/warmroll-coordinator:0.1.0 .
# The binaries are static (musl) and run on distroless images without a shell.

FROM docker.io/library/rust:1.95-alpine AS build
# musl-dev: the C runtime ring links against; protoc: proto/build.rs.
RUN apk add --no-cache musl-dev protobuf-dev
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p warmroll-agent -p warmroll-coordinator \
 && mkdir -p /out \
 && cp target/release/warmroll-agent target/release/warmroll-coordinator /out/ \
 && ! ldd /out/warmroll-agent 2>/dev/null | grep -q "=>"

# The agent talks to the root-owned CRI socket, so it runs as root; the chart drops
# every capability and forbids privilege escalation.
FROM gcr.io/distroless/static-debian12:latest AS agent
COPY --from=build /out/warmroll-agent /usr/local/bin/warmroll-agent
ENTRYPOINT ["/usr/local/bin/warmroll-agent"]
CMD ["run"]

FROM gcr.io/distroless/static-debian12:nonroot AS coordinator
COPY --from=build /out/warmroll-coordinator /usr/local/bin/warmroll-coordinator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/warmroll-coordinator"]
CMD ["run"]
