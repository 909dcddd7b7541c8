# syntax=docker/dockerfile:1
# One image for every ecpm role: `docker run IMAGE monitor -c ...`, `probe -c ...`,
# `responder -c ...`, `check-config FILE`. Built by deploy/docker-compose.yml:
#   docker build -t ecpm:local .
# pjsua2 comes from the PyPI wheel (pjsua2-python, manylinux, its C libraries bundled);
# no compiler and no system pjproject are needed.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/ecpm
WORKDIR /src
# dependencies first, so a source change does not re-download them
COPY pyproject.toml README.md ./
RUN mkdir -p ecpm probes monitor \
 && touch ecpm/__init__.py probes/__init__.py monitor/__init__.py \
 && /opt/ecpm/bin/pip install '.[postgres]' \
 && /opt/ecpm/bin/pip uninstall -y ecpm
COPY ecpm ./ecpm
COPY probes ./probes
COPY monitor ./monitor
RUN /opt/ecpm/bin/pip install --no-deps . \
 && /opt/ecpm/bin/python -c "import pjsua2, psycopg, monitor.service, probes.config" \
 && /opt/ecpm/bin/ecpm --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="ecpm" \
      org.opencontainers.image.description="Synthetic emergency-call path monitor: probe, responder and monitor" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 ecpm \
 && useradd --system --uid 10001 --gid ecpm --home-dir /var/lib/ecpm --shell /usr/sbin/nologin ecpm \
 && install -d -o ecpm -g ecpm -m 0750 /var/lib/ecpm \
 && install -d -m 0755 /etc/ecpm
COPY --from=build /opt/ecpm /opt/ecpm
ENV PATH=/opt/ecpm/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER ecpm:ecpm
WORKDIR /var/lib/ecpm
VOLUME ["/var/lib/ecpm"]
# monitor HTTP, probe health, responder SIP and its fault-control HTTP
EXPOSE 9470/tcp 9469/tcp 5090/udp 5090/tcp 8091/tcp
ENTRYPOINT ["ecpm"]
CMD ["--help"]
