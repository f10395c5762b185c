# The gateway: pure Python. Builds with no registry and no network:
#   BASE   an image with python3 + python3-venv whose Python matches the wheelhouse's
#          (default: the local Debian base, `appliance images build` makes it with debootstrap)
#   .build/wheels  the wheelhouse (`pip wheel` on the host; `appliance images build` fills it)
ARG BASE=llm-appliance/debian-base:bookworm
FROM ${BASE} AS build
COPY .build/wheels /wheels
COPY pyproject.toml /src/
COPY docker/requirements.py /src/docker/
RUN python3 -m venv /opt/venv \
    && python3 /src/docker/requirements.py gateway > /src/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels -c /wheels/constraints.txt \
       -r /src/requirements.txt \
    && /opt/venv/bin/python -m pip uninstall --yes --quiet pip setuptools

FROM ${BASE}
RUN groupadd --system --gid 10001 appliance && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home appliance
COPY --from=build /opt/venv /opt/venv
COPY appliance /opt/app/appliance
COPY gateway /opt/app/gateway
RUN python3 -m compileall -q /opt/app
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/opt/app PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \
    APPLIANCE_DATA_DIR=/data
USER 10001
WORKDIR /data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --retries=3 --start-period=20s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
CMD ["python", "-m", "gateway"]
