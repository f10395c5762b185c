# The GPU exporter: pynvml reads the host driver's NVML (the NVIDIA container toolkit mounts it).
FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /data appliance
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=utility
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/requirements.py docker/
RUN python docker/requirements.py --only pydantic pydantic-settings aiohttp prometheus-client nvidia-ml-py \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY appliance appliance
COPY observability observability
RUN pip install --no-deps . && rm -rf /src
USER appliance
WORKDIR /data
EXPOSE 9835
CMD ["python", "-m", "observability.gpu_exporter"]
