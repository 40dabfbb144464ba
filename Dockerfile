# syntax=docker/dockerfile:1
# mouse-serve: the gRPC action server for MOUSE models.
#
# GPU image (default): PyTorch's CUDA runtime image, whose torch is kept as it is.
#   docker build -t mouse-serve .
# CPU image: a slim Python base; torch comes from PyTorch's CPU wheel index.
#   docker build -t mouse-serve:cpu \
#     --build-arg BASE=python:3.11-slim \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
#
# Configuration is by MOUSE_SERVE_* environment variables (one per `mouse-serve` flag, see
# `docker run --rm mouse-serve --help`); arguments after the image name are passed to the server.

ARG BASE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
FROM ${BASE}

# Used only when the base has no torch (e.g. python:3.11-slim): the torch to install and the
# index it comes from (PyPI's Linux wheels are CUDA builds; PyTorch's CPU index has small ones).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://pypi.org/simple

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/hf-cache \
    MOUSE_SERVE_HOST=0.0.0.0 \
    MOUSE_SERVE_PORT=50051 \
    MOUSE_SERVE_METRICS_PORT=9100 \
    MOUSE_SERVE_MODEL=/models/default \
    MOUSE_SERVE_DEVICE=auto

# torch first (only where the base lacks it), then the package with its server extra; the
# constraint keeps the torch that is there, so pip picks a tensordict that suits it instead of
# replacing the base image's CUDA build with another torch.
COPY pyproject.toml README.md /tmp/src/
COPY mouse_core /tmp/src/mouse_core
COPY server /tmp/src/server
COPY client /tmp/src/client
RUN if ! python -c "import torch" 2>/dev/null; then \
        pip install --no-cache-dir --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}"; \
    fi \
    && python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-constraint.txt \
    && pip install --no-cache-dir --constraint /tmp/torch-constraint.txt "/tmp/src[server]" \
    && rm -rf /tmp/src /tmp/torch-constraint.txt \
    && mouse-serve --help > /dev/null

COPY --chmod=755 deploy/healthcheck.py /usr/local/bin/mouse-serve-healthcheck

# A non-root user; the model folder and the Hugging Face cache are volumes it can write to.
RUN groupadd --gid 10001 mouse \
    && useradd --no-log-init --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin mouse \
    && mkdir -p /models /hf-cache \
    && chown mouse:mouse /models /hf-cache
USER 10001:10001
WORKDIR /home/mouse
VOLUME ["/models", "/hf-cache"]

# gRPC (ActionService, health, reflection) and Prometheus metrics (/metrics).
EXPOSE 50051 9100

# Loading a model (or downloading it into /hf-cache) takes a while: start-period covers it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["mouse-serve-healthcheck"]

ENTRYPOINT ["mouse-serve"]
