#!/usr/bin/env bash
# Wheels of the Python packages the lent GPU machine lacks, downloaded here (a package registry is reachable here,
# nothing is there) into a git-ignored folder that the device tool carries. Usage:
#
#   bash benchmarks/gpu_wheels.sh              # .whl/ for the device's Python 3.12 on x86-64 Linux
#   bash benchmarks/gpu_wheels.sh /tmp/w 3.11  # another folder and Python (to try the set in a venv here)
#
# The device image has torch, transformers, peft, accelerate, huggingface-hub, safetensors, numpy, pillow,
# prometheus-client, anyio, click, h11, httpx, pytest and pytest-timeout (the device README's list), not these.
# Versions are the ones the suite passes with here; --no-deps, so the list is the whole closure over the image.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
python_version=${2:-3.12}
WHEELS=(
  diffusers==0.42.1 importlib-metadata==10.2.0
  pydantic==2.13.4 pydantic-core==2.46.4 pydantic-settings==2.14.1 annotated-types==0.7.0
  typing-inspection==0.4.2 typing-extensions==4.16.0 python-dotenv==1.2.2
  fastapi==0.165.0 fastapi-offline==1.7.7 annotated-doc==0.0.7 starlette==1.10.0 python-multipart==0.0.34
  opentelemetry-api==1.45.2 lazy-importer==0.1.0 zipp==4.1.2 uvicorn==0.55.0
)
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dest" "${WHEELS[@]}"
ls -1 "$dest"
du -sh "$dest"
