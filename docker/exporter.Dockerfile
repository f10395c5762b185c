# The GPU exporter: pynvml reads the host driver's NVML (the NVIDIA container toolkit mounts it), so any
# base with python3 + python3-venv will do; the default is the local Debian base and the wheelhouse.
ARG BASE=llm-appliance/debian-base:bookworm
FROM ${BASE} AS build
COPY .build/wheels /wheels
COPY pyproject.toml /src/
COPY docker/requirements.py /src/docker/
RUN python3 -m venv /opt/venv \
    && python3 /src/docker/requirements.py exporter > /src/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels -c /wheels/constraints.txt \
       -r /src/requirements.txt \
    && /opt/venv/bin/python -m pip uninstall --yes --quiet pip setuptools

FROM ${BASE}
RUN groupadd --system --gid 10001 appliance && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home appliance
COPY --from=build /opt/venv /opt/venv
COPY appliance /opt/app/appliance
COPY observability /opt/app/observability
RUN python3 -m compileall -q /opt/app
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/opt/app PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=utility
USER 10001
WORKDIR /tmp
EXPOSE 9835
HEALTHCHECK --interval=15s --timeout=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9835/health', timeout=3)"]
CMD ["python", "-m", "observability.gpu_exporter"]
