# skillable-exporter container image.
#
#   docker build -t skillable-exporter .
#   docker run -p 10180:10180 skillable-exporter --demo
#   docker run -p 10180:10180 -e SKILLABLE_API_KEY=... skillable-exporter
#
# Offline builds (no package index reachable from inside the build): put the
# wheels of the project's dependencies and of its build backend in ./wheels
# (`pip wheel -w wheels .` plus `pip download -d wheels setuptools wheel`) and
# pass pip's own settings as build arguments:
#
#   docker build --network none \
#     --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/src/wheels .
#
# Any other base with python3 and the venv module works too:
#   --build-arg BASE=local/bookworm-python:3.11
# See docs/deployment.md.

ARG BASE=python:3.11-slim

############################################################################
# Build stage: build the project's wheel and install it into a venv.
FROM ${BASE} AS build

# pip reads these from the environment; declaring them lets `--build-arg`
# reach pip. Unset by default, so a normal build uses the public index.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# .dockerignore keeps the context to pyproject.toml, README.md, LICENSE,
# exporter/ and an optional wheels/ directory.
COPY . /src

# Build details for `--version` and skillable_exporter_build_info:
#   docker build --build-arg REVISION="$(git rev-parse HEAD)" \
#                --build-arg BRANCH="$(git rev-parse --abbrev-ref HEAD)" .
ARG REVISION=unknown
ARG BRANCH=unknown
RUN python3 -m exporter.version --write --revision="${REVISION}" --branch="${BRANCH}" --build-user=docker

RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip wheel --no-deps --wheel-dir /tmp/dist /src \
 && /opt/venv/bin/pip install /tmp/dist/*.whl \
 && /opt/venv/bin/pip uninstall --yes pip setuptools

############################################################################
# Runtime stage: the base image plus the venv, nothing else.
FROM ${BASE}

LABEL org.opencontainers.image.title="skillable-exporter" \
      org.opencontainers.image.description="Prometheus exporter for Skillable (Lab on Demand) lab results" \
      org.opencontainers.image.licenses="Apache-2.0"

# Fixed numeric UID/GID (Kubernetes runAsNonRoot can verify a number, not a
# name). The state directory is the only place the exporter writes.
ARG UID=65532
RUN mkdir -p /var/lib/skillable-exporter /etc/skillable-exporter \
 && chown "${UID}:${UID}" /var/lib/skillable-exporter

COPY --from=build /opt/venv /opt/venv

# PATH is spelled out: an imported base image may carry no PATH at all.
# MALLOC_ARENA_MAX=2: with glibc's default (up to 8 malloc arenas per core)
# the threads that serve concurrent scrapes spread over many arenas; under 50
# concurrent scrapers the RSS climbed from 41 to 83 MB before flattening. With
# 2 arenas it stays near 50 MB. musl-based images ignore it.
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    MALLOC_ARENA_MAX=2 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SKILLABLE_EXPORTER_LISTEN_ADDRESS=0.0.0.0:10180 \
    SKILLABLE_STATE_FILE=/var/lib/skillable-exporter/state.json \
    HEALTHCHECK_URL=http://127.0.0.1:10180/healthz

USER ${UID}:${UID}
WORKDIR /var/lib/skillable-exporter
EXPOSE 10180

# No curl in slim images: the stdlib does the probe. urlopen raises (exit 1)
# on a refused connection, a timeout or any non-2xx answer. /healthz never
# calls the Skillable API and needs no basic auth, so this is cheap. Set
# HEALTHCHECK_URL when the exporter listens elsewhere (another port with
# --network host, or https:// with a web config file; the certificate is not
# verified for this loopback probe).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import os, ssl, urllib.request; urllib.request.urlopen(os.environ.get('HEALTHCHECK_URL', 'http://127.0.0.1:10180/healthz'), timeout=4, context=ssl._create_unverified_context())"]

# Arguments go straight to the exporter: `docker run IMAGE --demo`. The listen
# address comes from SKILLABLE_EXPORTER_LISTEN_ADDRESS above (all interfaces,
# as a container must); --web.listen-address overrides it.
ENTRYPOINT ["skillable-exporter"]
