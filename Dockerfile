# syntax=docker/dockerfile:1
#
# Quiesce: a two-stage image. The build stage installs the project into a virtualenv
# at /opt/quiesce; the final stage copies only that venv onto a clean base, so no
# compiler, pip cache or source tree reaches the image that runs.
#
# The base image is a build argument so it can come from an internal mirror:
#   docker build --build-arg BASE_IMAGE=mirror.example.com/library/python:3.12.8-slim-bookworm .
# Any Debian-based image with Python >= 3.11 works. Both stages must use the same
# image: the venv's interpreter is a symlink to the base image's python3.
ARG BASE_IMAGE=python:3.12.8-slim-bookworm

FROM ${BASE_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
RUN python3 -m venv /opt/quiesce

# Dependencies first, from the lock: exact versions, every file checked against its
# hash, nothing resolved at build time, so two builds of one commit install the same
# bytes. The lock covers every platform (x86_64 and aarch64 wheels) and Python >= 3.11;
# refresh it with the command in its header (see README.md, "Development"). This layer
# is cached until the lock changes.
COPY requirements.lock ./
RUN /opt/quiesce/bin/pip install --no-cache-dir --require-hashes --no-deps -r requirements.lock

# Then the project itself, without dependencies (all of them came from the lock);
# `pip check` fails the build if the lock is missing one for this Python. (The build
# backend, setuptools, is used for this step only and never reaches the image.)
# pip byte-compiles the modules here, because the final image runs with a read-only
# root filesystem.
COPY pyproject.toml README.md ./
COPY service ./service
RUN /opt/quiesce/bin/pip install --no-cache-dir --no-deps . \
    && /opt/quiesce/bin/pip check


FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="quiesce" \
      org.opencontainers.image.description="A worker container for Kubernetes that runs webhook-created jobs in-process and drains correctly on shutdown." \
      org.opencontainers.image.licenses="MIT"

# A fixed, unprivileged identity; the Deployment's securityContext uses the same ids.
RUN groupadd --gid 10001 quiesce \
    && useradd --uid 10001 --gid 10001 --no-log-init --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin quiesce

COPY --from=build /opt/quiesce /opt/quiesce

ENV PATH="/opt/quiesce/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=8000

USER 10001:10001
EXPOSE 8000

# SIGTERM starts the drain: readiness turns 503, new runs are refused, active runs get
# QUIESCE_SHUTDOWN_GRACE_SECONDS to finish, then the process exits 0.
STOPSIGNAL SIGTERM

# Exec form, no shell: `quiesce serve` validates the configuration and then runs
# Granian in the same process, so Granian is PID 1 and receives the stop signal itself.
CMD ["quiesce", "serve"]
