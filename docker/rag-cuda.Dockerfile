# RAG service: sentence-transformers embeddings on the GPU and faiss-gpu indexes.
# (the CPU build, ONNX Runtime and no torch, is docker/rag.Dockerfile). The base is a build argument.
ARG CUDA_VERSION=12.6.3
ARG CUDA_BASE=nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
FROM ${CUDA_BASE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /data appliance
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 APPLIANCE_DATA_DIR=/data PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/requirements.py docker/
# The rag extra with rag-torch (sentence-transformers on the GPU); faiss-gpu (the "gpu" extra) replaces
# faiss-cpu: both provide the faiss module.
RUN python docker/requirements.py rag rag-torch gpu --without faiss-cpu > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY appliance appliance
COPY rag rag
RUN pip install --no-deps . && rm -rf /src
ENV HOME=/tmp
USER 10001
WORKDIR /data
EXPOSE 8300
CMD ["python", "-m", "rag"]
