#!/usr/bin/env bash
# Build the project's own Dockerfile with a real Docker engine and run the
# image in demo mode: /healthz and /metrics answer, Docker reports the
# container healthy, and it runs as a non-root user on a read-only root
# filesystem. Everything this script starts is removed on exit.
#
# Usage (as root, on Debian 12):  bash .ci/docker-test.sh
#
# This machine cannot reach Docker Hub and pip inside a build cannot reach the
# package index (see docs/deployment.md), so the script
#   1. installs Debian's docker.io and debootstrap,
#   2. starts a private dockerd (own socket, data and exec roots under a
#      mktemp directory; --bridge=none --iptables=false: host networking is
#      left alone),
#   3. builds a local python base image with debootstrap,
#   4. prepares the wheels on the host (pip wheel),
#   5. builds ./Dockerfile unchanged, steering it only with build arguments
#      (BASE, PIP_NO_INDEX, PIP_FIND_LINKS), with --network none,
#   6. runs the image with --network host --pull never and checks it.
#
# Environment (all optional):
#   PYTHON                  host python 3.11 with pip (default: python3)
#   DEBIAN_MIRROR           debootstrap mirror (default: http://deb.debian.org/debian)
#   DOCKER_TEST_BASE_CACHE  a directory OUTSIDE the repo in which to keep the
#                           debootstrapped base as a tarball between runs; unset
#                           (the default, and what CI does) builds it from scratch
#   DOCKER_TEST_KEEP=1      keep the work directory (logs) after a failure
set -Eeuo pipefail

readonly BASE_IMAGE=local/bookworm-python:3.11
readonly IMAGE=skillable-exporter:ci-test
readonly CONTAINER=skillable-exporter-ci-$$
readonly UID_EXPECTED=65532
readonly DEBOOTSTRAP_ARGS=(--variant=minbase --include=python3,python3-venv bookworm)
readonly DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON=${PYTHON:-python3}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO
T0=$SECONDS
WORK=""
DKPID=""
DOCKER=""
FAILED=0

log() { printf 'docker-test [%3ds] %s\n' "$((SECONDS - T0))" "$*"; }
fail() {
    FAILED=1
    printf 'docker-test: FAIL: %s\n' "$*" >&2
    exit 1
}

dump_diagnostics() {
    [[ -n $DOCKER && -n $WORK && -S $WORK/docker.sock ]] || return 0
    if "$DOCKER" container inspect "$CONTAINER" >/dev/null 2>&1; then
        echo "---- container logs (last 40 lines) ----" >&2
        "$DOCKER" logs --tail 40 "$CONTAINER" >&2 2>&1 || true
        echo "---- health log ----" >&2
        "$DOCKER" inspect -f '{{json .State.Health}}' "$CONTAINER" >&2 || true
    fi
    if [[ -f $WORK/dockerd.log ]]; then
        echo "---- dockerd log (last 20 lines) ----" >&2
        tail -n 20 "$WORK/dockerd.log" >&2 || true
    fi
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    ((rc != 0)) && dump_diagnostics
    if [[ -n $DOCKER && -n $WORK && -S $WORK/docker.sock ]]; then
        "$DOCKER" rm -f "$CONTAINER" >/dev/null 2>&1
        "$DOCKER" rmi -f "$IMAGE" "$BASE_IMAGE" >/dev/null 2>&1
    fi
    if [[ -n $DKPID ]] && kill -0 "$DKPID" 2>/dev/null; then
        kill -TERM "$DKPID"
        for _ in $(seq 1 100); do kill -0 "$DKPID" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$DKPID" 2>/dev/null; then
            echo "docker-test: dockerd did not stop in 20 s, killing it" >&2
            kill -KILL "$DKPID"
        fi
        wait "$DKPID" 2>/dev/null
    fi
    if [[ -n $WORK && -d $WORK ]]; then
        # dockerd leaves an nsfs mount behind (exec-root/netns/default), and a
        # debootstrap that died half-way can leave proc/sys mounted in the
        # rootfs: unmount everything below the work directory, deepest first.
        awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts |
            sort -r | while read -r m; do umount -l "$m"; done
        if [[ ${DOCKER_TEST_KEEP:-0} == 1 && $rc != 0 ]]; then
            echo "docker-test: keeping $WORK" >&2
        else
            rm -rf "$WORK"
        fi
    fi
    if ((rc == 0)); then
        log "PASS"
    elif ((FAILED == 0)); then
        echo "docker-test: FAIL: unexpected error (exit $rc), see the output above" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# http_get URL -> prints the body; non-zero on a refused connection or non-2xx.
http_get() {
    "$PYTHON" - "$1" <<'EOF'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
    sys.stdout.write(r.read().decode("utf-8", "replace"))
EOF
}

# free_demo_port -> a port for --demo, whose next one (the demo API's) is free too, chosen below
# the kernel's ephemeral range as the tests' are (tests/ports.py): the test suite runs beside this
# script on the host network, and its connections take ephemeral ports.
free_demo_port() { (cd "$REPO" && "$PYTHON" -m tests.ports); }

############################################################################
log "repo $REPO"
[[ $(id -u) == 0 ]] || fail "must run as root (it starts dockerd and debootstrap)"
[[ -f $REPO/Dockerfile ]] || fail "no Dockerfile in $REPO"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
    fail "$PYTHON is not Python 3.11; the wheels must match the image's Debian 12 python3.11 (set PYTHON=...)"

log "installing docker.io and debootstrap"
export DEBIAN_FRONTEND=noninteractive
# With recommends, as measured in real-components.md (apparmor among them: a host
# with AppArmor enabled needs apparmor_parser for the docker-default profile).
apt_install() { apt-get install -y -qq docker.io debootstrap >/dev/null; }
apt_install || { apt-get update -qq && apt_install; } || fail "apt-get install docker.io debootstrap failed"
DOCKER=/usr/bin/docker # Debian's client, matching Debian's dockerd (not a newer one on PATH)
[[ -x $DOCKER && -x /usr/sbin/dockerd ]] || fail "docker.io did not provide /usr/bin/docker and /usr/sbin/dockerd"

WORK=$(mktemp -d /tmp/skillable-docker-test.XXXXXX)
log "work directory $WORK"

if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    # Debian's python3 comes without pip; a throw-away venv has it.
    log "$PYTHON has no pip: creating a venv for it"
    "$PYTHON" -m venv "$WORK/venv" >/dev/null 2>&1 ||
        fail "$PYTHON has neither pip nor a working venv module (apt-get install python3-venv, or set PYTHON=...)"
    PYTHON="$WORK/venv/bin/python"
fi

############################################################################
log "starting a private dockerd"
/usr/sbin/dockerd -H "unix://$WORK/docker.sock" --data-root "$WORK/data" --exec-root "$WORK/exec" \
    --pidfile "$WORK/docker.pid" --bridge=none --iptables=false --ip6tables=false \
    >"$WORK/dockerd.log" 2>&1 &
DKPID=$!
export DOCKER_HOST="unix://$WORK/docker.sock" DOCKER_BUILDKIT=0 # no buildx: legacy builder
for _ in $(seq 1 300); do
    "$DOCKER" info >/dev/null 2>&1 && break
    kill -0 "$DKPID" 2>/dev/null || fail "dockerd exited during start-up (log: $WORK/dockerd.log)"
    sleep 0.1
done
"$DOCKER" info >/dev/null 2>&1 || fail "dockerd did not answer within 30 s"
log "dockerd $("$DOCKER" version -f '{{.Server.Version}}') ready (pid $DKPID)"

############################################################################
# A local stand-in for python:3.11-slim: Debian 12 minbase + python3 + venv.
cache_tar=""
if [[ -n ${DOCKER_TEST_BASE_CACHE:-} ]]; then
    key=$(printf '%s ' "${DEBOOTSTRAP_ARGS[@]}" "$DEBIAN_MIRROR" | sha256sum | cut -c1-12)
    cache_tar="$DOCKER_TEST_BASE_CACHE/bookworm-python-$key.tar"
fi
import_base() {
    "$DOCKER" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
}
if [[ -n $cache_tar && -s $cache_tar ]]; then
    log "importing the cached base image $cache_tar"
    import_base <"$cache_tar" || fail "docker import of $cache_tar failed (delete it to rebuild)"
else
    log "building the base image with debootstrap (about a minute)"
    rootfs="$WORK/rootfs"
    mkdir "$rootfs"
    debootstrap "${DEBOOTSTRAP_ARGS[@]}" "$rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
        { tail -n 20 "$WORK/debootstrap.log" >&2; fail "debootstrap failed (log above)"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    if [[ -n $cache_tar ]]; then
        mkdir -p "$DOCKER_TEST_BASE_CACHE"
        tar -C "$rootfs" -cf "$cache_tar.tmp" . && mv "$cache_tar.tmp" "$cache_tar"
        import_base <"$cache_tar" || fail "docker import failed"
    else
        tar -C "$rootfs" -c . | import_base || fail "docker import failed"
    fi
    rm -rf "$rootfs"
fi
log "base image $BASE_IMAGE ready"

############################################################################
# Build context: the working tree (the Dockerfile's .dockerignore picks what
# is sent) plus wheels/ prepared here, on the host.
ctx="$WORK/context"
mkdir "$ctx"
tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./wheels -c . | tar -C "$ctx" -x
log "preparing wheels on the host"
build_requires=$("$PYTHON" -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["build-system"]["requires"]))' "$REPO/pyproject.toml")
mapfile -t build_requires <<<"$build_requires"
# Build from the copy: an in-tree build leaves build/ and *.egg-info behind.
"$PYTHON" -m pip wheel -q --disable-pip-version-check -w "$ctx/wheels" "$ctx" >"$WORK/pip.log" 2>&1 ||
    { tail -n 20 "$WORK/pip.log" >&2; fail "pip wheel of the project failed"; }
"$PYTHON" -m pip download -q --disable-pip-version-check --only-binary=:all: -d "$ctx/wheels" \
    "${build_requires[@]}" >>"$WORK/pip.log" 2>&1 ||
    { tail -n 20 "$WORK/pip.log" >&2; fail "pip download of the build backend failed"; }
# The image builds its own wheel of the project: leave only the dependencies.
rm -rf "$ctx"/wheels/skillable_exporter-*.whl "$ctx/build" "$ctx"/*.egg-info
log "wheels: $(cd "$ctx/wheels" && ls | tr '\n' ' ')"

############################################################################
log "docker build (network none, base $BASE_IMAGE)"
t_build=$SECONDS
revision=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
"$DOCKER" build --network none -f "$ctx/Dockerfile" -t "$IMAGE" \
    --build-arg "BASE=$BASE_IMAGE" \
    --build-arg PIP_NO_INDEX=1 \
    --build-arg PIP_FIND_LINKS=/src/wheels \
    --build-arg "REVISION=$revision" \
    "$ctx" >"$WORK/build.log" 2>&1 ||
    { tail -n 30 "$WORK/build.log" >&2; fail "docker build failed (log above)"; }
log "image built in $((SECONDS - t_build)) s, $("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

user=$("$DOCKER" image inspect -f '{{.Config.User}}' "$IMAGE")
[[ $user == "$UID_EXPECTED:$UID_EXPECTED" ]] || fail "image USER is '$user', expected $UID_EXPECTED:$UID_EXPECTED"
"$DOCKER" image inspect -f '{{json .Config.Healthcheck}}' "$IMAGE" | grep -q healthz ||
    fail "image has no HEALTHCHECK on /healthz"

############################################################################
# run_demo PORT: start the container; its exporter listens on PORT, its demo API on PORT + 1.
run_demo() {
    # --health-interval only speeds up the image's own HEALTHCHECK command;
    # HEALTHCHECK_URL points it at the port chosen here.
    "$DOCKER" run -d --name "$CONTAINER" --pull never --network host \
        --read-only --tmpfs /tmp --tmpfs "/var/lib/skillable-exporter:uid=$UID_EXPECTED,gid=$UID_EXPECTED" \
        --cap-drop ALL --security-opt no-new-privileges \
        --health-interval 1s --health-start-period 30s \
        -e "HEALTHCHECK_URL=http://127.0.0.1:$1/healthz" \
        "$IMAGE" --web.listen-address="127.0.0.1:$1" --demo >/dev/null ||
        fail "docker run failed"
}

# A port checked free can still be taken before the container binds it (the host network is
# shared with the test suite): a start that fails on "Address already in use" gets new ports.
for attempt in 1 2 3; do
    port=$(free_demo_port) || fail "no free port pair"
    log "docker run --demo on 127.0.0.1:$port (host network, read-only root filesystem)"
    run_demo "$port"
    for _ in $(seq 150); do # until it answers or exits, at most 30 s
        http_get "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
        [[ $("$DOCKER" inspect -f '{{.State.Running}}' "$CONTAINER") == true ]] || break
        sleep 0.2
    done
    if ((attempt < 3)) && [[ $("$DOCKER" inspect -f '{{.State.Running}}' "$CONTAINER") == false &&
        $("$DOCKER" logs "$CONTAINER" 2>&1) == *"Address already in use"* ]]; then
        log "port $port or $((port + 1)) was taken meanwhile: trying others"
        "$DOCKER" rm -f "$CONTAINER" >/dev/null 2>&1
        continue
    fi
    break
done

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2
    local deadline=$((SECONDS + limit))
    shift 2
    until "$@"; do
        [[ $("$DOCKER" inspect -f '{{.State.Running}}' "$CONTAINER") == true ]] ||
            fail "container exited (status $("$DOCKER" inspect -f '{{.State.ExitCode}}' "$CONTAINER")) while waiting for $what"
        ((SECONDS < deadline)) || fail "timed out after $limit s waiting for $what"
        sleep 0.2
    done
}

healthz_ok() { http_get "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; }
wait_for 30 "/healthz" healthz_ok
log "/healthz answers"

metrics_ok() {
    http_get "http://127.0.0.1:$port/metrics" >"$WORK/metrics.txt" 2>/dev/null &&
        grep -Eq '^skillable_up(\{[^}]*\})? 1(\.0)?$' "$WORK/metrics.txt"
}
wait_for 30 "/metrics with skillable_up 1" metrics_ok
grep -q "^skillable_exporter_build_info{.*revision=\"$revision\"" "$WORK/metrics.txt" ||
    fail "/metrics has no skillable_exporter_build_info with revision=\"$revision\" (the REVISION build argument)"
grep -q '^skillable_lab_instances' "$WORK/metrics.txt" || fail "/metrics has no skillable_lab_instances* series"
log "/metrics serves $(grep -vc '^#' "$WORK/metrics.txt") samples, skillable_up 1"

healthy() { [[ $("$DOCKER" inspect -f '{{.State.Health.Status}}' "$CONTAINER") == healthy ]]; }
wait_for 30 "docker health status 'healthy'" healthy
log "docker reports the container healthy"

uid=$("$DOCKER" exec "$CONTAINER" python3 -c 'import os; print(os.getuid())')
[[ $uid == "$UID_EXPECTED" ]] || fail "exporter runs as uid $uid, expected $UID_EXPECTED"
log "runs as uid $uid"

state_written() {
    "$DOCKER" exec "$CONTAINER" python3 -c \
        'import os, sys; sys.exit(os.path.getsize(os.environ["SKILLABLE_STATE_FILE"]) == 0)' 2>/dev/null
}
wait_for 20 "the state file (SKILLABLE_STATE_FILE) on the writable volume" state_written
log "state file written to the volume (root filesystem read-only)"
echo "---- container log ----"
"$DOCKER" logs "$CONTAINER" 2>&1 | head -n 20

"$DOCKER" stop -t 10 "$CONTAINER" >/dev/null
log "container stopped (exit status $("$DOCKER" inspect -f '{{.State.ExitCode}}' "$CONTAINER"))"
