# syntax=docker/dockerfile:1
# cdd-serve on a GPU host. Build from the repository root:
#   docker build -t cdd-serve .            (or: docker compose -f deploy/docker-compose.yml up)
# The base image brings CUDA and PyTorch; pip keeps its torch (the project asks torch>=2.3).
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    CDD_HOST=0.0.0.0 \
    CDD_PORT=8000 \
    CDD_DEVICE=cuda \
    CDD_DTYPE=bfloat16

WORKDIR /opt/cdd

# 1. Dependencies only (cached until pyproject.toml changes): install the project's requirements
#    from an empty package skeleton, then drop the skeleton itself.
COPY pyproject.toml README.md ./
RUN mkdir -p adapters runtime training/data \
 && touch __init__.py adapters/__init__.py runtime/__init__.py training/__init__.py training/data/__init__.py \
 && pip install . \
 && pip uninstall -y cdd-zoo \
 && rm -rf adapters runtime training __init__.py build *.egg-info

# 2. The source, the embedded backbone and zoo (package data).
COPY . .
RUN pip install --no-deps . && rm -rf build *.egg-info

RUN useradd --create-home --uid 1000 cdd \
 && mkdir -p /models/backbone /models/zoo \
 && chown -R cdd:cdd /models
USER cdd

# Mount a diffusers backbone folder at /models/backbone and a zoo at /models/zoo; with nothing
# mounted the embedded default backbone and zoo are served (deploy/entrypoint.sh decides).
VOLUME ["/models/backbone", "/models/zoo"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
ENTRYPOINT ["/opt/cdd/deploy/entrypoint.sh"]
