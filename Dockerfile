# cdd-serve in a container. Build from the repository root with BuildKit (Docker 23+ and `docker compose`
# use it by default; Docker 20.10-22: DOCKER_BUILDKIT=1):
#   docker build -t cdd-serve .                                  GPU host: CUDA + PyTorch base
#   docker build -t cdd-serve:cpu --build-arg BASE_IMAGE=python:3.11-slim-bookworm .     CPU only
# or through deploy/docker-compose.yml, which does both (the `cdd` service and the `cpu` profile).
#
# BASE_IMAGE: any image with `python` (3.11+) and `pip` on PATH. One that brings torch keeps it, and the build
# says so loudly when it is not TORCH_VERSION (the release the test suite passes on). One without gets
# torch==TORCH_VERSION from a wheel in deploy/pip/ when there is one, else from TORCH_INDEX_URL; left empty,
# that is PyTorch's CPU index on a base without CUDA (PyPI's torch for Linux is the multi-GB CUDA build),
# and on a CUDA base the build stops and asks for the CUDA index (never a silent CPU torch on a GPU image).
# deploy/pip/ (kept out of git and out of the image) may also hold cert.pem, a CA bundle for pip, for a
# network whose proxy re-signs TLS. Without a registry, deploy/base-images.sh makes a Python base from
# Debian packages.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    CDD_HOST=0.0.0.0 \
    CDD_PORT=8000 \
    CDD_DEVICE=cuda \
    CDD_DTYPE=bfloat16 \
    CDD_USER_ZOO=/models/zoo

WORKDIR /opt/cdd

# 1. torch, unless the base image has it.
RUN --mount=type=bind,source=deploy/pip,target=/tmp/pip \
    if [ -f /tmp/pip/cert.pem ]; then export PIP_CERT=/tmp/pip/cert.pem; fi \
 && if have=$(python -c "import torch; print(torch.__version__)" 2>/dev/null); then \
      echo "torch $have from the base image"; \
      case "$have" in "${TORCH_VERSION}"|"${TORCH_VERSION}"+*) ;; *) \
        echo "WARNING: the base image's torch is $have, not ${TORCH_VERSION} (the release the tests pass on);" \
             "pass --build-arg BASE_IMAGE=<an image with torch ${TORCH_VERSION}> to align them" ;; esac; \
    elif ls /tmp/pip/torch-*.whl >/dev/null 2>&1; then \
      pip install /tmp/pip/torch-*.whl; \
    else \
      index="${TORCH_INDEX_URL}"; \
      if [ -z "$index" ] && { [ -n "${CUDA_VERSION:-}" ] || [ -d /usr/local/cuda ]; }; then \
        echo "this base image has CUDA ${CUDA_VERSION:-} but no torch: pass --build-arg TORCH_INDEX_URL=" \
             "https://download.pytorch.org/whl/cuXYZ (the CUDA build matching it), or put a wheel in deploy/pip/" >&2; \
        exit 1; \
      fi; \
      pip install --index-url "${index:-https://download.pytorch.org/whl/cpu}" "torch==${TORCH_VERSION}"; \
    fi

# 2. The project's dependencies (cached until pyproject.toml changes): installed from an empty package
#    skeleton, which is then dropped.
COPY pyproject.toml /tmp/deps/
RUN --mount=type=bind,source=deploy/pip,target=/tmp/pip \
    if [ -f /tmp/pip/cert.pem ]; then export PIP_CERT=/tmp/pip/cert.pem; fi \
 && cd /tmp/deps \
 && mkdir -p adapters runtime/diffusion runtime/serving training/data \
 && touch README.md __init__.py adapters/__init__.py runtime/__init__.py runtime/diffusion/__init__.py runtime/serving/__init__.py training/__init__.py training/data/__init__.py \
 && pip install --find-links /tmp/pip . \
 && pip uninstall -y cdd-zoo \
 && rm -rf /tmp/deps

# 3. The package with its embedded backbone and zoo, installed from the build context (mounted, so no copy
#    of the source stays in the image).
RUN --mount=type=bind,target=/tmp/src,rw --mount=type=bind,source=deploy/pip,target=/tmp/pip \
    if [ -f /tmp/pip/cert.pem ]; then export PIP_CERT=/tmp/pip/cert.pem; fi \
 && pip install --no-deps /tmp/src
COPY deploy/entrypoint.sh /opt/cdd/entrypoint.sh

RUN useradd --create-home --uid 1000 cdd \
 && mkdir -p /models/backbone /models/zoo \
 && chown -R cdd:cdd /models
USER cdd

# Mount a diffusers backbone folder at /models/backbone and zoo entries at /models/zoo (the user zoo, which
# `cdd-zoo install` writes to); with nothing mounted the embedded default backbone and zoo are served
# (deploy/entrypoint.sh decides and says which).
VOLUME ["/models/backbone", "/models/zoo"]
EXPOSE 8000
# Healthy once /readyz answers 200: the backbone is loaded and every adapter architecture warmed up.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"
ENTRYPOINT ["/opt/cdd/entrypoint.sh"]
