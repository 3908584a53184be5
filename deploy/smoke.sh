#!/usr/bin/env bash
# End-to-end check of deploy/docker-compose.yml's CPU profile on this host: build the image, start
# cdd-serve and Prometheus, wait for the health check, send a super-resolution request, check Prometheus
# scrapes the service, serve a mounted zoo with an entry written by `cdd-zoo install`, then take it all
# down. Prints each stage with its time; exits non-zero at the first failure (after cleaning up).
#
#   deploy/smoke.sh                   from the repository root (or anywhere)
#
# Needs docker-compose (1.29) or Docker's compose plugin, a docker CLI that builds with BuildKit, curl and
# python3. Traffic: the build's downloads (PyPI, a Debian mirror when it makes base images), then only the
# ports the stack publishes on 127.0.0.1 and the stack's own network. Leaves behind only the images.
#
# Environment (all optional):
#   SMOKE_BASE=auto|registry|debian  base images: registry = python:3.11-slim-bookworm and prom/prometheus;
#                       debian = made from Debian packages by deploy/base-images.sh (root, debootstrap); auto
#                       (default) = registry when `docker pull` reaches it, else debian
#   TORCH_WHEEL=PATH    a torch wheel (CPU, cp311) for the build; default: one found in PIP_FIND_LINKS folders,
#                       else the build downloads PyTorch's CPU wheel
#   PIP_CERT=PATH       a CA bundle the build's pip trusts too (a proxy that re-signs TLS)
#   DOCKERD_ARGS        flags for the engine started when none answers (default: vfs, no iptables, no bridge)
#   SMOKE_TIMEOUT_S     the health-check wait, per start (default 600)
#   SMOKE_OUT=DIR       keep the answers (PNG) there
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEPLOY="$ROOT/deploy"
PROJECT=cdd-smoke
SMOKE_BASE=${SMOKE_BASE:-auto}
SMOKE_TIMEOUT_S=${SMOKE_TIMEOUT_S:-600}
DOCKERD_ARGS=${DOCKERD_ARGS:---storage-driver=vfs --iptables=false --bridge=none}
T0=$(date +%s)
WORK=""
STARTED_DOCKERD=""
ADDED_TO_PIP=()
COMPOSE_FILES=(-f "$DEPLOY/docker-compose.yml")
STACK_UP=""

stage() { echo; echo "== [$(($(date +%s) - T0)) s] $*"; }
say() { echo "   $*"; }
die() { echo "SMOKE FAILED: $*" >&2; exit 1; }
compose() { "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" --profile cpu "$@"; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

cleanup() {
  local rc=$?
  set +e
  if [ -n "$STACK_UP" ]; then
    if [ $rc -ne 0 ]; then
      stage "failure: the stack's last log lines"
      compose logs --no-color --tail 40 2>&1 | sed 's/^/   /'
    fi
    stage "down"
    compose down --volumes --remove-orphans 2>&1 | sed 's/^/   /'
    left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
    [ -z "$left" ] || docker rm -f -v $left >/dev/null  # one that was still being created
    say "left of project $PROJECT: $(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" | wc -l) containers," \
      "$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l) networks," \
      "$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l) volumes;" \
      "images kept: $(docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' cdd-serve:cpu)"
  fi
  for f in "${ADDED_TO_PIP[@]}"; do rm -f "$f"; done
  [ -z "$WORK" ] || rm -rf "$WORK"
  if [ -n "$STARTED_DOCKERD" ]; then
    say "stopping the engine this script started (pid $STARTED_DOCKERD)"
    kill "$STARTED_DOCKERD" && while kill -0 "$STARTED_DOCKERD" 2>/dev/null; do sleep 1; done
  fi
  if [ $rc -eq 0 ]; then stage "smoke test passed"; else echo "smoke test FAILED (exit $rc)" >&2; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in docker curl python3; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
if command -v docker-compose >/dev/null; then COMPOSE=(docker-compose); else COMPOSE=(docker compose); fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cdd-smoke.XXXXXX")

# -- the engine --------------------------------------------------------------------------------------------
stage "engine"
if docker info >/dev/null 2>&1; then
  say "using the running engine ($(docker info -f '{{.ServerVersion}}, storage {{.Driver}}'))"
else
  [ "$(id -u)" = 0 ] || die "no Docker engine answers, and starting one needs root"
  # shellcheck disable=SC2086  # DOCKERD_ARGS is a list of flags
  dockerd $DOCKERD_ARGS >"$WORK/dockerd.log" 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -n 20 "$WORK/dockerd.log" >&2; die "the engine did not answer in 60 s"; }
  say "started dockerd $DOCKERD_ARGS (pid $STARTED_DOCKERD)"
fi

# BuildKit (the Dockerfile mounts deploy/pip/ while it installs): the docker CLI that compose calls must have
# it: buildx, or a 20.10-22 CLI with it built in. Take the first such docker on PATH.
BUILD_DOCKER=""
while read -r d; do
  major=$("$d" version -f '{{.Client.Version}}' 2>/dev/null | cut -d. -f1) || true
  if "$d" buildx version >/dev/null 2>&1 || { [ -n "$major" ] && [ "$major" -ge 20 ] && [ "$major" -le 22 ]; }; then
    BUILD_DOCKER=$d; break
  fi
done < <(type -ap docker)
[ -n "$BUILD_DOCKER" ] || die "no docker CLI on PATH builds with BuildKit (install the buildx plugin)"
export PATH="$(dirname "$BUILD_DOCKER"):$PATH" COMPOSE_DOCKER_CLI_BUILD=1 DOCKER_BUILDKIT=1
say "builds with $BUILD_DOCKER ($(docker version -f 'client {{.Client.Version}}, engine {{.Server.Version}}'))"

# -- base images -------------------------------------------------------------------------------------------
stage "base images ($SMOKE_BASE)"
if [ "$SMOKE_BASE" = auto ]; then
  if timeout 120 docker pull -q python:3.11-slim-bookworm >/dev/null 2>&1; then SMOKE_BASE=registry; else SMOKE_BASE=debian; fi
  say "auto: ${SMOKE_BASE} ($([ $SMOKE_BASE = registry ] && echo 'the registry answers' || echo 'no registry answers'))"
fi
case $SMOKE_BASE in
  registry)
    export CDD_CPU_BASE_IMAGE=python:3.11-slim-bookworm PROMETHEUS_IMAGE=prom/prometheus:v2.53.0
    docker pull -q "$PROMETHEUS_IMAGE" >/dev/null ;;
  debian)
    export CDD_CPU_BASE_IMAGE=cdd-python:3.11-bookworm PROMETHEUS_IMAGE=cdd-prometheus:bookworm
    missing=()
    docker image inspect "$CDD_CPU_BASE_IMAGE" >/dev/null 2>&1 || missing+=(python)
    docker image inspect "$PROMETHEUS_IMAGE" >/dev/null 2>&1 || missing+=(prometheus)
    if [ ${#missing[@]} -gt 0 ]; then
      s=$(date +%s)
      "$DEPLOY/base-images.sh" "${missing[@]}" | sed 's/^/   /'
      say "made ${missing[*]} in $(($(date +%s) - s)) s"
    fi ;;
  *) die "SMOKE_BASE is auto, registry or debian, not '$SMOKE_BASE'" ;;
esac
say "CDD_CPU_BASE_IMAGE=$CDD_CPU_BASE_IMAGE PROMETHEUS_IMAGE=$PROMETHEUS_IMAGE"

# -- build -------------------------------------------------------------------------------------------------
stage "build cdd-serve:cpu"
if [ -z "${TORCH_WHEEL:-}" ]; then
  IFS=' ' read -r -a links <<< "${PIP_FIND_LINKS:-}"
  for d in "${links[@]}"; do
    for w in "$d"/torch-*+cpu-cp311-*.whl; do [ -f "$w" ] && TORCH_WHEEL=$w && break 2; done
  done
fi
add_to_pip() {  # copy a file into deploy/pip/ for the build; removed again at the end unless it was there
  [ -e "$DEPLOY/pip/$2" ] || ADDED_TO_PIP+=("$DEPLOY/pip/$2")
  cp "$1" "$DEPLOY/pip/$2"
}
if [ -n "${TORCH_WHEEL:-}" ]; then add_to_pip "$TORCH_WHEEL" "$(basename "$TORCH_WHEEL")"; say "torch: $TORCH_WHEEL"; fi
if [ -n "${PIP_CERT:-}" ]; then add_to_pip "$PIP_CERT" cert.pem; say "pip trusts $PIP_CERT"; fi
if ! docker network inspect bridge >/dev/null 2>&1; then
  # An engine without the default bridge (--bridge=none) builds on the host's network.
  printf 'services:\n  cdd-cpu:\n    build:\n      network: host\n' > "$WORK/build-network.yml"
  COMPOSE_FILES+=(-f "$WORK/build-network.yml")
  say "the engine has no default bridge: building on the host network"
fi
s=$(date +%s)
compose build cdd-cpu > "$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log" >&2; die "the build failed"; }
say "built in $(($(date +%s) - s)) s; cdd-serve:cpu is $(docker image inspect -f '{{.Size}}' cdd-serve:cpu | awk '{printf "%.2f GB", $1 / 1e9}')"

# -- up ----------------------------------------------------------------------------------------------------
# The stack's own empty model folders (not the user's deploy/models), readable as a user's would be.
mkdir -m 755 -p "$WORK/models/backbone" "$WORK/models/zoo"
export COMPOSE_HTTP_TIMEOUT=${COMPOSE_HTTP_TIMEOUT:-900}  # creating a container copies its image on vfs
export CDD_BIND=127.0.0.1 CDD_PORT=${CDD_PORT:-$(free_port)} PROMETHEUS_PORT=${PROMETHEUS_PORT:-$(free_port)}
export CDD_BACKBONE_DIR="$WORK/models/backbone" CDD_ZOO_DIR="$WORK/models/zoo"
BASE="http://127.0.0.1:$CDD_PORT"
PROM="http://127.0.0.1:$PROMETHEUS_PORT"

# wait_healthy: until cdd-cpu's health check (GET /readyz) has passed since the container last started; prints
# the time since UP_AT (when compose was asked to start it) and since the container was running.
wait_healthy() {
  local cid state
  cid=$(compose ps -q cdd-cpu)
  while :; do
    state=$(docker inspect "$cid" | python3 -c 'import json, sys
s = json.load(sys.stdin)[0]["State"]
started = s["StartedAt"][:19]
passed = [p for p in (s.get("Health") or {}).get("Log") or [] if p["ExitCode"] == 0 and p["Start"][:19] > started]
print(s["Status"], "healthy" if s["Running"] and passed else (s.get("Health") or {}).get("Status", "-"), started)')
    case $state in
      "running healthy "*) break ;;
      running\ *) ;;
      *) die "cdd-cpu is $state" ;;
    esac
    [ $(($(date +%s) - UP_AT)) -lt "$SMOKE_TIMEOUT_S" ] || die "cdd-cpu not healthy in $SMOKE_TIMEOUT_S s ($state)"
    sleep 1
  done
  local started
  started=$(date -d "${state##* }Z" +%s)
  say "healthy $(($(date +%s) - UP_AT)) s after compose was asked, $(($(date +%s) - started)) s after the container started; the entrypoint said:"
  docker logs "$cid" 2>&1 | grep '^cdd-entrypoint' | tail -n 2 | sed 's/^/     /'
}

stage "up: cdd-cpu and prometheus (127.0.0.1:$CDD_PORT, 127.0.0.1:$PROMETHEUS_PORT), embedded zoo"
STACK_UP=1
UP_AT=$(date +%s)
compose up -d --no-build cdd-cpu prometheus 2>&1 | sed 's/^/   /'
wait_healthy
say "torch in the image: $(docker exec "$(compose ps -q cdd-cpu)" python -c 'import torch; print(torch.__version__)')"

# -- a request ---------------------------------------------------------------------------------------------
# check_png FILE W H: FILE is a PNG of W x H that is not one flat colour.
check_png() {
  python3 - "$@" <<'EOF'
import struct, sys, zlib
data, w, h = open(sys.argv[1], "rb").read(), int(sys.argv[2]), int(sys.argv[3])
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
size = struct.unpack(">II", data[16:24])
assert size == (w, h), f"{size[0]}x{size[1]}, expected {w}x{h}"
idat, pos = b"", 8
while pos < len(data):
    n, kind = struct.unpack(">I4s", data[pos:pos + 8])
    idat += data[pos + 8:pos + 8 + n] if kind == b"IDAT" else b""
    pos += 12 + n
assert len(set(zlib.decompress(idat))) > 8, "one flat colour"
print(f"a {w}x{h} PNG, {len(data)} bytes")
EOF
}
# An input: a 16 x 16 RGB gradient PNG, written with the standard library.
python3 - "$WORK/in.png" <<'EOF'
import struct, sys, zlib
w = h = 16
rows = b"".join(b"\0" + bytes(v for x in range(w) for v in (16 * x, 16 * y, 128)) for y in range(h))
chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
open(sys.argv[1], "wb").write(png)
EOF

# task_request ADAPTER: POST a 16 x 16 image to super-resolution (ADAPTER: the adapter asked for, or ""),
# check the 64 x 64 PNG and that ADAPTER (when given) answered.
task_request() {
  local form=(-F "image=@$WORK/in.png;type=image/png" -F seed=7) s code
  [ -z "$1" ] || form+=(-F "adapter=$1")
  s=$(date +%s%N)
  code=$(curl -sS --max-time 120 -o "$WORK/out.png" -D "$WORK/headers" -w '%{http_code}' "${form[@]}" "$BASE/v1/tasks/super-resolution") \
    || die "POST /v1/tasks/super-resolution: no answer (curl: $code)"
  [ "$code" = 200 ] || die "POST /v1/tasks/super-resolution: HTTP $code $(head -c 400 "$WORK/out.png")"
  say "POST /v1/tasks/super-resolution: HTTP $code in $((($(date +%s%N) - s) / 1000000)) ms," \
    "$(tr -d '\r' < "$WORK/headers" | grep -i -E '^x-cdd-(adapter|steps|sampler)' | tr '\n' ' ')"
  local png
  png=$(check_png "$WORK/out.png" 64 64) || die "the answer is not the expected PNG"
  say "$png"
  [ -z "${SMOKE_OUT:-}" ] || { mkdir -p "$SMOKE_OUT"; cp "$WORK/in.png" "$SMOKE_OUT/in.png"; cp "$WORK/out.png" "$SMOKE_OUT/out-${1:-default}.png"; }
  [ -z "$1" ] || grep -qi "^x-cdd-adapter: $1" "$WORK/headers" || die "not answered by $1"
}
stage "request through 127.0.0.1:$CDD_PORT"
task_request ""
cp "$WORK/out.png" "$WORK/embedded.png"

# -- Prometheus --------------------------------------------------------------------------------------------
stage "Prometheus scrapes cdd-cpu"
# prom_wait URL EXPR: poll a Prometheus API URL until the python expression EXPR (over `d`, the
# response's data) is true; prints its value.
prom_wait() {
  local url=$1 expr=$2 s out
  s=$(date +%s)
  while :; do
    out=$(curl -sS --max-time 5 "$url" 2>/dev/null | python3 -c "import json, sys; d = json.load(sys.stdin)['data']; v = $expr; print(v) if v else sys.exit(1)" 2>/dev/null) && break
    [ $(($(date +%s) - s)) -lt 90 ] || die "Prometheus: no answer to $url satisfying $expr in 90 s"
    sleep 2
  done
  echo "$out"
}
target=$(prom_wait "$PROM/api/v1/targets" "[f\"{t['labels']['job']} {t['scrapeUrl']} health={t['health']}\" for t in d['activeTargets'] if t['health'] == 'up']")
say "target: $target"
q='cdd_http_requests_total{route="/v1/tasks/{task}",code="200"}'
url="$PROM/api/v1/query?query=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$q")"
sample=$(prom_wait "$url" "[f\"{r['metric']['instance']} value={r['value'][1]}\" for r in d['result'] if float(r['value'][1]) >= 1]")
say "query $q: $sample"

# -- a mounted zoo -----------------------------------------------------------------------------------------
# What a user does: `cdd-zoo install` an entry into the zoo folder mounted at /models/zoo (the container's user
# zoo; here as this host user, with the image's cdd-zoo), restart the service; its entrypoint serves that zoo
# (or says why it cannot).
stage "a mounted zoo: cdd-zoo install as this host user (uid $(id -u)), restart, served by the container's user"
CID=$(compose ps -q cdd-cpu)
docker exec --user "$(id -u):$(id -g)" "$CID" sh -c \
  'cdd-zoo install --name sr-mine "$(python -c "from cdd.adapters.zoo import default_zoo_dir; print(default_zoo_dir())")/super-resolution"' \
  2>&1 | sed 's/^/   /'
say "on the host: $(cd "$CDD_ZOO_DIR" && find . -printf '%M %u:%g %p\n' | sort -k3 | tr '\n' ';')"
UP_AT=$(date +%s)
compose restart cdd-cpu 2>&1 | sed 's/^/   /'
wait_healthy
tasks=$(curl -sS --max-time 10 "$BASE/v1/tasks") || die "GET /v1/tasks: no answer"
python3 -c 'import json, sys
t = {x["task"]: [a["name"] for a in x["adapters"]] for x in json.loads(sys.argv[1])["tasks"]}
print("   served:", t)
sys.exit("sr-mine" not in t.get("super-resolution", []))' "$tasks" || die "the mounted zoo's entry is not served"
task_request sr-mine
cmp -s "$WORK/out.png" "$WORK/embedded.png" || die "sr-mine (a copy of super-resolution) answered other bytes for the same seed"
say "the same bytes as the embedded super-resolution entry for the same seed"
