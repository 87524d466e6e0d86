# ha-exporter: the exporter and the simulated masters (`ha-exporter master`) share this image.
#   docker build -t ha-exporter .
#   docker run -p 9108:9108 -v $PWD/deploy/compose/config.yml:/etc/ha-exporter/config.yml:ro \
#     -e HA_EXPORTER_TOKEN=... ha-exporter
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN pip install . \
 && useradd --system --uid 10001 --home-dir /var/lib/ha-exporter --create-home ha-exporter \
 && rm -rf /src

WORKDIR /var/lib/ha-exporter
USER ha-exporter
EXPOSE 9108
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=2)"
ENTRYPOINT ["ha-exporter"]
CMD ["run", "--config", "/etc/ha-exporter/config.yml"]
