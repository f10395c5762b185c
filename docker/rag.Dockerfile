# RAG service on the CPU (the GPU build is docker/rag-cuda.Dockerfile): all-MiniLM-L6-v2 on ONNX Runtime and
# faiss-cpu; no torch in the image. The ONNX graph is exported once on the host (torch lives there, in the
# venv) into .build/onnx/encoder.onnx and baked in under the fingerprint of the model files as installed
# here; docker/rag-entrypoint.sh seeds data/rag/onnx with it, where the service looks for its export cache.
ARG BASE=llm-appliance/debian-base:bookworm
FROM ${BASE} AS build
COPY .build/wheels /wheels
COPY pyproject.toml /src/
COPY docker/requirements.py /src/docker/
RUN python3 -m venv /opt/venv \
    && python3 /src/docker/requirements.py rag > /src/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels -c /wheels/constraints.txt \
       -r /src/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels --no-deps \
       $(python3 /src/docker/requirements.py --wheelhouse-no-deps)
COPY appliance /src/appliance
COPY rag /src/rag
# Exported by the CLI under umask 077 (0600, root's): made readable for the service's user (10001) below.
COPY .build/onnx/encoder.onnx /tmp/encoder.onnx
# The weights (model.safetensors) only feed an export, which is done: the ONNX path reads the tokenizer and
# the configs, so the image drops them (90 MB) before fingerprinting the model files as they will be.
RUN model=$(PYTHONPATH=/src /opt/venv/bin/python -c "from rag.embedder import model_directory; \
print(model_directory('')[0])") \
    && rm "$model/model.safetensors" \
    && fingerprint=$(PYTHONPATH=/src /opt/venv/bin/python -c "from rag.embedder import model_directory; \
from rag.onnx_model import fingerprint; print(fingerprint(model_directory('')[0]))") \
    && mkdir -p "/opt/onnx/$fingerprint" && mv /tmp/encoder.onnx "/opt/onnx/$fingerprint/encoder.onnx" \
    && chmod -R a+rX /opt/onnx \
    && /opt/venv/bin/python -m pip uninstall --yes --quiet pip setuptools

FROM ${BASE}
RUN groupadd --system --gid 10001 appliance && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home appliance
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/onnx /opt/onnx
COPY appliance /opt/app/appliance
COPY rag /opt/app/rag
COPY docker/rag-entrypoint.sh /usr/local/bin/rag-entrypoint
RUN python3 -m compileall -q /opt/app
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/opt/app PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \
    APPLIANCE_DATA_DIR=/data HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
USER 10001
WORKDIR /data
EXPOSE 8300
HEALTHCHECK --interval=10s --timeout=5s --retries=3 --start-period=120s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8300/health', timeout=3)"]
ENTRYPOINT ["rag-entrypoint"]
CMD ["python", "-m", "rag"]
