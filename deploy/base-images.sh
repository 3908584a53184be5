#!/usr/bin/env bash
# Make the two base images the CPU profile needs from Debian packages alone, for a host that reaches
# no image registry (Docker Hub) but does reach a Debian mirror:
#
#   cdd-python:3.11-bookworm   Debian's python3 (3.11) with a virtual environment at /opt/venv on PATH,
#                              so `python` and `pip install` work as in python:3.11-slim-bookworm
#   cdd-prometheus:bookworm    Debian's prometheus package, laid out like prom/prometheus (entrypoint,
#                              config at /etc/prometheus/prometheus.yml, data in /prometheus, user nobody)
#
# Then point the compose file at them:
#   CDD_CPU_BASE_IMAGE=cdd-python:3.11-bookworm PROMETHEUS_IMAGE=cdd-prometheus:bookworm \
#     docker compose -f deploy/docker-compose.yml --profile cpu up --build cdd-cpu prometheus
#
# Needs root, debootstrap and a running Docker engine. Usage: deploy/base-images.sh [python|prometheus]...
# (both by default). MIRROR (default http://deb.debian.org/debian) and CACHE (default
# /var/tmp/cdd-base-images/cache, the downloaded packages, kept between runs) can be set. Each run builds its
# root filesystems in a folder of its own (under TMPDIR, default /var/tmp), removed when it ends (a failed
# run keeps its debootstrap logs there and says where), so two runs at once do not overwrite each other.
set -euo pipefail

MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
CACHE=${CACHE:-/var/tmp/cdd-base-images/cache}
PYTHON_IMAGE=${PYTHON_IMAGE:-cdd-python:3.11-bookworm}
PROM_IMAGE=${PROM_IMAGE:-cdd-prometheus:bookworm}
PATH_IN_IMAGE=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "base-images: $*"; }
die() { echo "base-images: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd first)"
mkdir -p "$CACHE"
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/cdd-base-images.XXXXXX")
finish() {
  local rc=$?
  if [ $rc -eq 0 ]; then rm -rf "$WORK"; else
    find "$WORK" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +  # the root filesystems; the logs stay
    echo "base-images: this run's logs are in $WORK" >&2
  fi
}
trap finish EXIT

# rootfs NAME PACKAGES: a minimal Debian root filesystem with PACKAGES, in $WORK/NAME (made afresh).
rootfs() {
  local dir="$WORK/$1"
  rm -rf "$dir"
  say "debootstrap $SUITE ($2) into $dir"
  debootstrap --variant=minbase --include="$2" --cache-dir="$CACHE" "$SUITE" "$dir" "$MIRROR" \
    > "$WORK/$1.log" 2>&1 || { tail -n 20 "$WORK/$1.log" >&2; die "debootstrap failed (log: $WORK/$1.log)"; }
}

# slim ROOT: drop what a container never reads (package lists, caches, docs, man pages).
slim() {
  rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb \
    "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/usr/share/info/* "$1"/usr/share/locale/* "$1"/var/log/*.log
}

# import ROOT TAG CHANGES...: the root filesystem as an image.
import() {
  local dir=$1 tag=$2
  shift 2
  local changes=()
  for c in "$@"; do changes+=(--change "$c"); done
  tar --numeric-owner -C "$dir" -c . | docker import "${changes[@]}" - "$tag" >/dev/null
  say "$tag: $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1 / 1e6}')"
  rm -rf "$dir"
}

python_image() {
  local dir="$WORK/python"
  rootfs python python3,python3-venv,ca-certificates,passwd
  # Debian's python3 refuses `pip install` outside a virtual environment (PEP 668); the image's `python`
  # and `pip` are a venv's, as python:3.11-slim's are a plain install's.
  chroot "$dir" /usr/bin/python3 -m venv /opt/venv
  chroot "$dir" /opt/venv/bin/python -m pip --version >/dev/null
  slim "$dir"
  import "$dir" "$PYTHON_IMAGE" "ENV PATH=$PATH_IN_IMAGE" "ENV LANG=C.UTF-8" 'CMD ["python"]'
}

prometheus_image() {
  local dir="$WORK/prometheus"
  rootfs prometheus prometheus,ca-certificates
  rm -f "$dir"/etc/prometheus/*.yml
  rm -rf "$dir"/usr/share/javascript/moment-timezone/data  # raw zone data (212 MB) the web UI never reads
  mkdir -p "$dir/prometheus"
  chown 65534:65534 "$dir/prometheus"
  slim "$dir"
  import "$dir" "$PROM_IMAGE" "USER nobody" "WORKDIR /prometheus" "EXPOSE 9090" 'VOLUME ["/prometheus"]' \
    'ENTRYPOINT ["/usr/bin/prometheus"]' \
    'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(python prometheus)
for t in "${targets[@]}"; do
  case $t in
    python) python_image ;;
    prometheus) prometheus_image ;;
    *) die "unknown image '$t' (python or prometheus)" ;;
  esac
done
