# syntax=docker/dockerfile:1
# tidegate's image: `tidegate serve` with the example config (config/tidegate.yaml).
#
#   docker build -t tidegate:0.1.0 .
#   openssl rand -hex 32 > token && chmod 0644 token
#   docker run --init --stop-timeout 60 -p 127.0.0.1:8790:8790 \
#       -v tidegate-data:/var/lib/tidegate -v "$PWD/token:/etc/tidegate/token:ro" \
#       tidegate:0.1.0
#
# The same image runs Dask schedulers and workers (`dask scheduler`, `dask worker`), so
# that the daemon and the cluster agree on Python, dask and tidegate versions; see
# config/k8s/daskcluster.yaml. docs/operations.md ("Container") says more, and what was not
# tested: no container engine runs where the tests run.

# --- builder: tidegate's wheel and the wheels of its runtime dependencies ----------------
FROM python:3.11-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY daemon/ daemon/
# Runtime dependencies only: no extras (the dev and examples ones stay out of the image).
RUN python -m pip wheel --wheel-dir /wheels .

# --- the image ----------------------------------------------------------------------------
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Installed from the builder's wheels only (--no-index), through a bind mount so that the
# wheels themselves are not left in a layer. The only index is the builder's own wheels,
# so there is no version to pin here (hadolint's DL3013).
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links=/wheels tidegate

# A fixed UID/GID, so that volume ownership and Kubernetes' runAsUser/fsGroup can name it.
RUN groupadd --system --gid 10001 tidegate \
 && useradd --system --uid 10001 --gid tidegate --home-dir /var/lib/tidegate \
        --no-create-home --shell /usr/sbin/nologin tidegate \
 && install -d -o tidegate -g tidegate -m 0750 /var/lib/tidegate /var/lib/tidegate/outputs

COPY config/tidegate.yaml /etc/tidegate/tidegate.yaml

# Reachable from outside the container. tidegate refuses to listen beyond loopback without
# an API token, so mount one where the config's security.token_file points
# (/etc/tidegate/token), or set TIDEGATE_SECURITY__TOKEN_FILE to a mounted secret's path.
# Environment variables win over the config file.
ENV TIDEGATE_LISTEN=0.0.0.0:8790
EXPOSE 8790

# state_dir (job queue, SQLite) and output_root (Parquet) are both under it.
VOLUME ["/var/lib/tidegate"]
WORKDIR /var/lib/tidegate
USER 10001:10001

# /healthz answers while the event loop runs (no token needed). No curl in a slim image:
# Python itself, on the port TIDEGATE_LISTEN names.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('TIDEGATE_LISTEN', ':8790').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]

# SIGTERM drains for up to drain_timeout_s (30 s): give `docker stop` more than that
# (--stop-timeout 60, or stop_grace_period in compose).
STOPSIGNAL SIGTERM
ENTRYPOINT ["tidegate"]
CMD ["serve", "--config", "/etc/tidegate/tidegate.yaml"]
