# MLProxy's control plane API (`mlproxy controlplane`), from the core install: no Envoy and no
# Redis server (those are the `local` extra, for the local stack). From the repository root:
#
#   docker build -f Dockerfile.cp -t mlproxy-controlplane:0.1.0 .
#
# tests/integration/test_dockerfiles.py lints this file with hadolint, checks its structure, and
# runs the build stage's RUN steps verbatim in a clean venv, then the ENTRYPOINT + CMD and the
# HEALTHCHECK from that venv; tests/e2e/test_containers.py builds both images with Docker and runs
# them as manifests/ does (`bash tests/tools/prepare-docker` first).
# Keep Dockerfile.extproc's build stage identical to this one.

# The base, pinned by patch release and by the digest of its multi-platform index (as published
# in docker-library/repo-info for the build of 2026-09-01). Both stages use it: the venv's python
# is a symlink to the base image's interpreter. To move to a newer build, take the "Digest:" line
# of `docker buildx imagetools inspect python:3.11.16-slim-bookworm`.
ARG BASE_IMAGE=python:3.11.16-slim-bookworm@sha256:c425d915a89a6dcd3183b1797ad9bd8878caff5a417f6371c8df93c8ea8b727f

FROM ${BASE_IMAGE} AS build
ENV VENV=/opt/mlproxy \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mlproxy_kernel ./mlproxy_kernel
COPY mlproxy_common ./mlproxy_common
COPY mlproxy ./mlproxy
COPY extproc ./extproc
COPY controlplane ./controlplane
COPY bench ./bench
# The core install (not editable, no extras); pyproject.toml bounds every dependency. pip
# compiles the bytecode here, so the running container never writes any. pip and setuptools
# then leave the venv: nothing installs at run time. A build that reaches the package index
# through a TLS-inspecting proxy passes its CA bundle as a BuildKit secret,
# `--secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt`: mounted for this step only, it
# stays out of every layer (without the secret pip trusts its own bundle, as before).
RUN --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -m venv "$VENV" \
    && "$VENV/bin/pip" install --no-cache-dir . \
    && "$VENV/bin/pip" uninstall --yes pip setuptools \
    && "$VENV/bin/mlproxy" healthcheck --help > /dev/null

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG SOURCE_URL=""
ARG REVISION=""
LABEL org.opencontainers.image.title="mlproxy-controlplane" \
      org.opencontainers.image.description="MLProxy control plane: SLA policies in Redis, pushed to every ext_proc replica" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV VENV=/opt/mlproxy
ENV PATH="${VENV}/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A numeric user with no login shell and no home; it owns nothing (read-only root filesystem).
RUN groupadd --system --gid 10001 mlproxy \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin mlproxy
COPY --from=build ${VENV} ${VENV}
WORKDIR ${VENV}
USER 10001:10001
# The API, /healthz, /readyz and /metrics
EXPOSE 8080
# SIGTERM: uvicorn stops taking connections, finishes requests (up to 5 s), the fleet tuner
# gives up its lease, and the process exits 0.
STOPSIGNAL SIGTERM
# /healthz over HTTPS when MLPROXY_TLS_CERT is set (the control plane then serves HTTPS), else
# HTTP: the check follows the server's own settings.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["mlproxy", "healthcheck", "--controlplane", "127.0.0.1:8080"]
# Settings from the environment: MLPROXY_REDIS_URL, MLPROXY_ADMIN_TOKENS or
# MLPROXY_ADMIN_TOKENS_FILE (required), MLPROXY_READ_TOKENS(_FILE), MLPROXY_TUNER_INTERVAL_S...
ENTRYPOINT ["mlproxy", "controlplane"]
CMD ["--host", "0.0.0.0", "--port", "8080"]
