# Parley as an Amazon SageMaker bring-your-own-container image with bidirectional
# streaming (also a plain container: `docker run -p 8080:8080 IMAGE serve`).
#
# SageMaker starts the image as `IMAGE serve`: with the entrypoint below that is
# `parley serve`, and PARLEY_SAGEMAKER=true puts it in SageMaker mode: it listens on
# 0.0.0.0:8080, answers GET/POST /ping once the models are loaded, and serves the
# Realtime events on the WebSocket /invocations-bidirectional-stream (plus
# /v1/realtime and /twilio on the same port, for the invocation-path header).
#
# The models are installed at build time, so the container is healthy within
# seconds of starting and needs no network. Build:
#   docker build -t parley .        (or: podman build -t parley .)
# Where no image registry is reachable, make the Debian base locally first, e.g.
#   debootstrap --variant=minbase bookworm rootfs && tar -C rootfs -c . | podman import - debian:bookworm-slim
# and pass it with --build-arg BASE=localhost/debian:bookworm-slim.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates curl build-essential cmake clang libclang-dev pkg-config \
      libopus-dev espeak-ng libespeak-ng-dev python3 python3-pip python3-venv git \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH=/root/.cargo/bin:$PATH CARGO_TARGET_DIR=/target
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin parley

FROM ${BASE}
LABEL com.amazonaws.sagemaker.capabilities.bidirectional-streaming=true
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates libopus0 espeak-ng libespeak-ng1 python3 python3-pip python3-venv libgomp1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /target/release/parley /usr/local/bin/parley
ENV PARLEY_MODELS_DIR=/opt/parley/models \
    PARLEY_SAGEMAKER=true \
    PARLEY_LOG_JSON=1
# Models at build time: the container starts without downloading anything.
RUN parley models install
EXPOSE 8080
ENTRYPOINT ["parley"]
CMD ["serve"]
