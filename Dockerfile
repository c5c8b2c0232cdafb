# The bridge as a container: python -m server on :5050, as a non-root user.
#   docker build -t phone-bridge .
#   docker run --env-file .env -p 5050:5050 phone-bridge
# A fleet (two bridges, Redis, PostgreSQL, Caddy): deploy/compose.yaml, see deploy/README.md.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY server ./server
# A plain (non-editable) install into a venv that the final stage copies whole.
RUN python -m venv /opt/venv && /opt/venv/bin/pip install .

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=5050 \
    DATABASE_URL=sqlite:////data/calls.db \
    RECORDINGS_DIR=/data/recordings \
    RECORDS_SPOOL=/data/records-spool.jsonl \
    DO_NOT_CALL=/data/do-not-call.txt
# Time zones for campaigns' calling windows (Python's zoneinfo reads the system's database).
RUN apt-get update \
    && apt-get install -y --no-install-recommends tzdata \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /app \
        --shell /usr/sbin/nologin bridge \
    && mkdir -p /data \
    && chown bridge:bridge /data
COPY --from=build /opt/venv /opt/venv
# Prompts and tools are read relative to the working directory (config/...).
WORKDIR /app
COPY config ./config
USER bridge
EXPOSE 5050
# Writable state (/app is root-owned): SQLite records and recordings of a single container (a
# fleet uses PostgreSQL), the records spool (call records kept through a database outage) and
# the do-not-call list (POST /do-not-call appends to it; a fleet shares one file).
VOLUME ["/data"]
# No curl in slim images: the standard library asks /healthz (any non-2xx raises: unhealthy).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '5050'), timeout=2)"]
# SIGTERM starts the drain or handover (SHUTDOWN_MODE); give it SHUTDOWN_DRAIN_SECONDS + ~10 s.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "server"]
