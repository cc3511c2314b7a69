# syntax=docker/dockerfile:1
# clipsearch, CPU image. Installs exactly what `make install` installs (the pins that
# scripts/requirements.py prints from pyproject.toml) plus the project itself, and runs as a
# non-root user. Targets:
#   runtime (default)  clipsearch serve; also the image of every RayCluster pod
#   load               runtime + the pinned ghz, for the in-cluster load Job (k8s/load)
# Build: docker build -t clipsearch .   docker build --target load -t clipsearch-load .
# Run:   docker run -p 50051:50051 -v clipsearch-data:/data \
#            -e CLIPSEARCH_GATEWAY__AUTH__TOKENS="read,write,admin=$TOKEN" clipsearch
# (the gateway binds 0.0.0.0 in the image and refuses to without auth or TLS; for a local
# trial only, -e CLIPSEARCH_GATEWAY__ALLOW_INSECURE=true).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG GO_IMAGE=golang:1.26-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scripts/requirements.py scripts/
RUN python -m venv /opt/venv \
    && python scripts/requirements.py > /opt/requirements.txt \
    && /opt/venv/bin/pip install -r /opt/requirements.txt
COPY clipsearch clipsearch
COPY encoder_service encoder_service
COPY index_service index_service
COPY gateway gateway
COPY training training
RUN /opt/venv/bin/pip install --no-deps .

FROM ${GO_IMAGE} AS ghz
ARG GHZ_VERSION=v0.120.0
RUN CGO_ENABLED=0 GOBIN=/out go install github.com/bojand/ghz/cmd/ghz@${GHZ_VERSION}

FROM ${PYTHON_IMAGE} AS app
# tini reaps the Ray processes a pod starts (`ray start` daemonises them).
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.* \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 clipsearch \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/clipsearch clipsearch \
    && mkdir -p /data /models \
    && chown clipsearch:clipsearch /data /models
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=clipsearch:clipsearch load load
COPY --chown=clipsearch:clipsearch protos protos
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models \
    CLIPSEARCH_DATA_DIR=/data \
    CLIPSEARCH_GATEWAY__HOST=0.0.0.0
# Model cache (hub downloads) and shard data (write-ahead logs, snapshots).
VOLUME ["/models", "/data"]
USER 10001:10001
EXPOSE 50051
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["clipsearch", "serve"]

FROM app AS load
COPY --from=ghz /out/ghz /usr/local/bin/ghz
ENV GHZ=/usr/local/bin/ghz
CMD ["python", "-m", "load.run", "--help"]

FROM app AS runtime
