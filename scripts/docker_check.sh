#!/usr/bin/env bash
# The docker files, built and run: build both images of docker/Dockerfile, start
# docker-compose.yml with its CPU profile (Redis, the API, the CPU worker), wait until the API
# is ready, run `regcl demo` against it (train → merge → activate → segment over HTTP), then
# stop and remove the stack and its volumes. Prints image sizes and the time of each step.
#
# Opt-in, not part of `make test`: a cold build downloads about 3 GB from PyPI (torch and its
# CUDA libraries); the two images share their layers, 6.4 GB on disk.
#
# What a fresh Debian 12 machine needs first (root):
#   apt-get update && apt-get install -y docker.io docker-compose debootstrap
#   dockerd >/var/log/dockerd.log 2>&1 &        # where no init system starts it
# Debian's docker.io ships no buildx: the images then build with the classic builder
# (DOCKER_BUILDKIT=0), which docker/Dockerfile is written for as well as for BuildKit.
#
#   scripts/docker_check.sh                  # standard bases: python:3.11-slim, redis:7
#   scripts/docker_check.sh --local-bases    # bases made from Debian packages (no Docker Hub;
#                                            # docker/make_local_bases.sh, needs root)
#   scripts/docker_check.sh --cold           # drop the build cache and the images first
#
# Environment:
#   PIP_CERT     CA bundle pip verifies PyPI with (pip's own variable): copied to
#                docker/certs/ for the build's deps stage, removed after; not in the images
#   DOCKER       the docker client (default: docker)
#   REGCL_CLI    how to run `regcl` here (default: regcl if on PATH, otherwise inside the api
#                container), e.g. REGCL_CLI="python -m cli"
#   DEMO_ARGS    more arguments for `regcl demo` (e.g. "--train-images 8 --epochs 1")
#   LOG_DIR      where build, compose and demo logs go (default: a new temporary directory)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DOCKER=${DOCKER:-docker}
BASE_IMAGE=python:3.11-slim
REDIS_IMAGE=redis:7
PROJECT=regcl-check
LOG_DIR=${LOG_DIR:-$(mktemp -d -t regcl-docker-check.XXXXXX)}
local_bases=0 cold=0
for arg in "$@"; do
    case $arg in
        --local-bases) local_bases=1 ;;
        --cold) cold=1 ;;
        *) echo "unknown argument $arg (see the head of $0)" >&2; exit 2 ;;
    esac
done

log() { printf '[docker_check %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
fail() { log "FAILED: $*"; exit 1; }
declare -a summary=()
note() { summary+=("$1"); log "$1"; }

# -- tools ------------------------------------------------------------------------------------
if $DOCKER compose version >/dev/null 2>&1; then
    compose=("$DOCKER" compose)
elif command -v docker-compose >/dev/null; then
    compose=(docker-compose)
else
    fail "neither '$DOCKER compose' nor docker-compose is installed"
fi
$DOCKER version >/dev/null 2>&1 \
    || fail "'$DOCKER version' reaches no Docker engine: is dockerd running? (see the head of $0)"
if $DOCKER buildx version >/dev/null 2>&1; then
    export DOCKER_BUILDKIT=1
    builder="BuildKit (buildx)" progress=(--progress=plain)
else
    export DOCKER_BUILDKIT=0
    builder="the classic builder (no buildx plugin)" progress=()
fi
export COMPOSE_PROJECT_NAME=$PROJECT
note "docker: $($DOCKER version --format 'client {{.Client.Version}}, server {{.Server.Version}}'), $builder"
note "compose: ${compose[*]} $("${compose[@]}" version --short 2>/dev/null || "${compose[@]}" version | head -1)"

if (( local_bases )); then
    t=$(now)
    docker/make_local_bases.sh
    BASE_IMAGE=regcl-local/python:3.11 REDIS_IMAGE=regcl-local/redis:7
    note "local bases ready in $(since "$t") s"
fi
export REDIS_IMAGE

# -- build ------------------------------------------------------------------------------------
cert=docker/certs/docker-check-pip-cert.pem
if [[ -n ${PIP_CERT:-} ]]; then
    [[ -f $PIP_CERT ]] || fail "PIP_CERT=$PIP_CERT: no such file"
    cp "$PIP_CERT" "$cert"
    trap 'rm -f "$cert"' EXIT
fi
if (( cold )); then
    $DOCKER image rm -f regcl-api regcl-worker >/dev/null 2>&1 || true
    $DOCKER builder prune -af >/dev/null 2>&1 || true
    $DOCKER image prune -f >/dev/null
    log "build cache and images dropped: a cold build"
fi
for target in api worker; do
    t=$(now)
    log "building regcl-$target (base $BASE_IMAGE; log: $LOG_DIR/build-$target.log)"
    $DOCKER build "${progress[@]}" -f docker/Dockerfile --target "$target" -t "regcl-$target" \
        --build-arg "BASE=$BASE_IMAGE" . >"$LOG_DIR/build-$target.log" 2>&1 \
        || { tail -40 "$LOG_DIR/build-$target.log" >&2; fail "docker build --target $target"; }
    note "build regcl-$target: $(since "$t") s"
done

# -- run --------------------------------------------------------------------------------------
REGCL_ADMIN_KEYS=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
API_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export REGCL_ADMIN_KEYS API_PORT
up=("${compose[@]}" --profile cpu)

stop() {
    "${up[@]}" logs --no-color --timestamps >"$LOG_DIR/compose.log" 2>&1 || true
    "${up[@]}" down --volumes --remove-orphans >/dev/null 2>&1 || true
    rm -f "$cert"
}
trap stop EXIT

t=$(now)
"${up[@]}" up -d --no-build >"$LOG_DIR/compose-up.log" 2>&1 \
    || { cat "$LOG_DIR/compose-up.log" >&2; fail "compose up"; }
api=$("${up[@]}" ps -q api)
host_ready() {  # /readyz through the published port, as a client sees it
    python3 -c 'import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=2)' "$API_PORT" 2>/dev/null
}
ready=""
while :; do
    if [[ -z $ready ]] && host_ready; then
        ready=$(since "$t")
        note "compose up → /readyz answers 200 on port $API_PORT: $ready s"
    fi
    state=$($DOCKER inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$api")
    [[ $state == "running healthy" ]] && break
    [[ $state == running* ]] || { "${up[@]}" logs --no-color --tail 40 api >&2; fail "api: $state"; }
    awk -v s="$(since "$t")" 'BEGIN { exit !(s > 600) }' && fail "api not healthy after 600 s"
    sleep 1
done
note "compose up → api container healthy (its /readyz check, every 10 s): $(since "$t") s"
[[ $("${up[@]}" ps -q worker-cpu) ]] || fail "the CPU worker is not running"

# -- demo -------------------------------------------------------------------------------------
if [[ -n ${REGCL_CLI:-} ]]; then
    read -ra cli <<<"$REGCL_CLI"
    url=http://127.0.0.1:$API_PORT
elif command -v regcl >/dev/null; then
    cli=(regcl) url=http://127.0.0.1:$API_PORT
else
    cli=("${up[@]}" exec -T api regcl) url=http://127.0.0.1:8000
fi
read -ra demo_args <<<"${DEMO_ARGS:-}"
t=$(now)
log "regcl demo --url $url ${demo_args[*]} (log: $LOG_DIR/demo.log)"
set +e
"${cli[@]}" demo --url "$url" --admin-key "$REGCL_ADMIN_KEYS" "${demo_args[@]}" 2>&1 \
    | tee "$LOG_DIR/demo.log"
demo_rc=${PIPESTATUS[0]}
set -e
note "regcl demo (${cli[*]} demo --url $url ${demo_args[*]}): exit $demo_rc, $(since "$t") s"
while read -r line; do note "  demo: $line"; done < <(grep -E '^ *(live now serves|done in)' "$LOG_DIR/demo.log")

# -- sizes ------------------------------------------------------------------------------------
for image in regcl-api regcl-worker "$REDIS_IMAGE" "$BASE_IMAGE"; do
    bytes=$($DOCKER image inspect -f '{{.Size}}' "$image" 2>/dev/null) || continue
    note "image $image: $(awk -v b="$bytes" 'BEGIN { printf "%.2f GB", b / 1e9 }')"
done
layers() { $DOCKER image inspect -f '{{range .RootFS.Layers}}{{println .}}{{end}}' "$1" | grep . | sort; }
shared=$(comm -12 <(layers regcl-api) <(layers regcl-worker) | wc -l)
note "disk used by all images (shared layers once): $($DOCKER system df --format '{{.Type}} {{.Size}}' | awk '/^Images/ { print $2 }')"
note "layers: regcl-api $(layers regcl-api | wc -l), regcl-worker $(layers regcl-worker | wc -l), shared $shared"

printf '\n== docker_check summary (logs: %s)\n' "$LOG_DIR"
printf '  %s\n' "${summary[@]}"
(( demo_rc == 0 )) || fail "regcl demo exited $demo_rc"
