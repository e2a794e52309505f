# syntax=docker/dockerfile:1
# Parley: build a virtualenv from the lock in one stage, run it as a non-root user in another.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/parley
ENV PATH=/opt/parley/bin:$PATH
WORKDIR /src
# The same two pip steps as `make run` (README): the pinned lock, then Parley without deps.
COPY requirements.lock ./
RUN pip install -q -r requirements.lock
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY adapters ./adapters
RUN pip install -q --no-deps .

FROM python:3.11-slim AS runtime
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin parley \
    && mkdir -p /data && chown parley:parley /data
COPY --from=build /opt/parley /opt/parley
ENV PATH=/opt/parley/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PARLEY_DATA_DIR=/data \
    PARLEY_HTTP_PORT=3000
USER parley
WORKDIR /home/parley
VOLUME ["/data"]
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PARLEY_HTTP_PORT', '3000'), timeout=3)"]
# SIGTERM drains: replies in flight get PARLEY_SHUTDOWN_GRACE seconds, then are finalised.
STOPSIGNAL SIGTERM
CMD ["parley", "run"]
