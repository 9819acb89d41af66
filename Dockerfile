# syntax=docker/dockerfile:1
#
# Longhaul images. Two runtime targets from one file:
#
#   docker build -t longhaul:gpu .                  # target gpu (the last stage, the default):
#                                                   #   CUDA 13 + cuDNN 9 runtime, onnxruntime-gpu,
#                                                   #   torch CUDA build for TorchScript models
#   docker build --target cpu -t longhaul:cpu .     # python slim, onnxruntime (CPU), torch CPU
#
# Both carry the demo store (8 models, built in the `store` stage by `python -m exporters
# demo-store`, the same command as `make models`) at /models, run as the non-root user
# `longhaul` (uid 10001) and report health from /health/ready. Build args:
#   STORE_PRESET=demo|tiny    tiny builds the store in seconds (smoke tests); demo takes ~10 min
#   PYTHON_IMAGE, CUDA_IMAGE  base images; TORCH_CPU_INDEX / TORCH_CUDA_INDEX  torch wheel indexes
#   ONNXRUNTIME_GPU           onnxruntime-gpu version for the gpu image
# Pins come from pyproject.toml through deploy/docker/requirements.py, never from this file.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu22.04

# ---------------------------------------------------------------- pinned requirement lists
FROM ${PYTHON_IMAGE} AS requirements
ARG ONNXRUNTIME_GPU=1.31.1
WORKDIR /src
COPY pyproject.toml ./
COPY deploy/docker/requirements.py deploy/docker/
RUN python deploy/docker/requirements.py cpu /req/cpu \
    && python deploy/docker/requirements.py gpu /req/gpu --onnxruntime-gpu "${ONNXRUNTIME_GPU}"

# ---------------------------------------------------------------- CPU virtualenv
FROM ${PYTHON_IMAGE} AS cpu-venv
# PyPI's torch wheel is a multi-GB CUDA build: the CPU image takes torch from the CPU index.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
COPY --from=requirements /req/cpu /tmp/req
RUN python -m venv /opt/venv \
    && pip install --index-url "${TORCH_CPU_INDEX}" -r /tmp/req/torch.txt \
    && pip install -r /tmp/req/requirements.txt
WORKDIR /src
COPY pyproject.toml ./
COPY model_store model_store
COPY service service
COPY exporters exporters
RUN pip install --no-deps . && rm -rf /src/build

# ---------------------------------------------------------------- the demo store
# Trained and exported on the CPU (the checkpoints are thrown away; only the store is kept).
FROM cpu-venv AS store
ARG STORE_PRESET=demo
RUN python -m exporters demo-store --preset "${STORE_PRESET}" \
        --checkpoints /tmp/checkpoints --store /models \
    && python -m model_store verify /models \
    && rm -rf /tmp/checkpoints

# ---------------------------------------------------------------- CPU runtime
FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 longhaul \
    && useradd --system --uid 10001 --gid longhaul --create-home --home-dir /home/longhaul longhaul
COPY --from=cpu-venv /opt/venv /opt/venv
COPY --from=store --chown=10001:10001 /models /models
COPY deploy/docker/healthcheck.py /usr/local/lib/longhaul/healthcheck.py
COPY --chmod=0755 deploy/docker/seed-store.sh /usr/local/bin/longhaul-seed-store
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LONGHAUL_STORE=/models \
    LONGHAUL_HOST=0.0.0.0 \
    LONGHAUL_PORT=8000 \
    LONGHAUL_PROVIDERS='["CPUExecutionProvider"]'
USER 10001:10001
WORKDIR /home/longhaul
EXPOSE 8000
# start-period: models load and warm up after the socket opens; 503 until then.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "/usr/local/lib/longhaul/healthcheck.py"]
ENTRYPOINT ["python", "-m", "service"]

# ---------------------------------------------------------------- GPU base: CUDA + Python 3.11
FROM ${CUDA_IMAGE} AS gpu-base
# Ubuntu 22.04 ships Python 3.11 in universe; the project requires 3.11. Versions are not pinned:
# the CUDA base tag fixes the distribution release, and its security updates should flow in.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------- GPU virtualenv
FROM gpu-base AS gpu-venv
# torch CUDA 13.0 build, matching the base image and onnxruntime-gpu (CUDA 13, cuDNN 9).
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu130
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
COPY --from=requirements /req/gpu /tmp/req
RUN python3.11 -m venv /opt/venv \
    && pip install --index-url "${TORCH_CUDA_INDEX}" -r /tmp/req/torch.txt \
    && pip install -r /tmp/req/requirements.txt
WORKDIR /src
COPY pyproject.toml ./
COPY model_store model_store
COPY service service
COPY exporters exporters
RUN pip install --no-deps . && rm -rf /src/build

# ---------------------------------------------------------------- GPU runtime (default target)
FROM gpu-base AS gpu
RUN groupadd --system --gid 10001 longhaul \
    && useradd --system --uid 10001 --gid longhaul --create-home --home-dir /home/longhaul longhaul
COPY --from=gpu-venv /opt/venv /opt/venv
COPY --from=store --chown=10001:10001 /models /models
COPY deploy/docker/healthcheck.py /usr/local/lib/longhaul/healthcheck.py
COPY --chmod=0755 deploy/docker/seed-store.sh /usr/local/bin/longhaul-seed-store
# NVIDIA_* tell the container toolkit to mount the driver's compute libraries.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LONGHAUL_STORE=/models \
    LONGHAUL_HOST=0.0.0.0 \
    LONGHAUL_PORT=8000 \
    LONGHAUL_PROVIDERS='["CUDAExecutionProvider", "CPUExecutionProvider"]'
USER 10001:10001
WORKDIR /home/longhaul
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/usr/local/lib/longhaul/healthcheck.py"]
ENTRYPOINT ["python", "-m", "service"]
