#!/usr/bin/env bash
# The cluster's services on this machine, without Kubernetes or Docker, all on 127.0.0.1:
#   - a Ray head (`ray start --head`, from the repository root, so `python jobs/route_batch.py`
#     and `serve.app:app` resolve as in the image), with the environment the pods get;
#   - SeaweedFS (`weed mini`) as the S3 store, with the buckets created;
#   - the MLflow tracking server, mlflow/server.sh as on the cluster: runs and registry in a
#     database (SQLite here, PostgreSQL there), artifacts proxied to S3.
#
#   infra/local/up.sh                  # or `make local-up`
#   source .r2ray/local/env.sh         # the clients' environment (tracking URI, S3, Ray)
#   ... `ray job submit`, `serve deploy .r2ray/local/serve.yaml` (README, "Deploy") ...
#   infra/local/down.sh                # stops exactly what this started
#
# Settings (environment; defaults in brackets): R2RAY_LOCAL_DIR [.r2ray/local] (state, logs,
# env.sh, serve.yaml), R2RAY_PYTHON [.venv/bin/python], R2RAY_LOCAL_CPUS [2],
# R2RAY_LOCAL_OBJECT_STORE_BYTES [1000000000], R2RAY_LOCAL_BUCKETS [backlog routed r2ray-mlflow],
# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY [r2ray-local / r2ray-local-secret], R2RAY_API_KEYS
# [r2ray-local-key] (for Serve's clients), R2RAY_UPSTREAM_API_KEY, and every port:
# R2RAY_LOCAL_RAY_PORT [6380], _DASHBOARD_PORT [8265], _RAY_CLIENT_PORT [10001],
# _DASHBOARD_AGENT_PORT [52365], _SERVE_PORT [8000], _MLFLOW_PORT [5000], _S3_PORT [8333],
# _WEED_MASTER_PORT [9333], _WEED_VOLUME_PORT [9340], _WEED_FILER_PORT [8888],
# _WEED_ADMIN_PORT [23646], _HAPROXY_METRICS_PORT [9102], _HAPROXY_STATS_PORT [8404],
# _WAIT_S [120] (per service).
# Serve runs behind Ray's HAProxy ingress, as on the cluster (infra/k8s: RAY_SERVE_ENABLE_HA_PROXY);
# its metrics listener moves off HAProxy's default 9101, which `weed mini` holds.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="${R2RAY_LOCAL_DIR:-$REPO/.r2ray/local}"
DIR="$(mkdir -p "$DIR" && cd "$DIR" && pwd)"
PY="${R2RAY_PYTHON:-$REPO/.venv/bin/python}"
BIN="$(dirname "$PY")"
export PATH="$BIN:$PATH"  # ray, mlflow, weed from the project's environment

RAY_PORT="${R2RAY_LOCAL_RAY_PORT:-6380}"
DASHBOARD_PORT="${R2RAY_LOCAL_DASHBOARD_PORT:-8265}"
RAY_CLIENT_PORT="${R2RAY_LOCAL_RAY_CLIENT_PORT:-10001}"
DASHBOARD_AGENT_PORT="${R2RAY_LOCAL_DASHBOARD_AGENT_PORT:-52365}"
SERVE_PORT="${R2RAY_LOCAL_SERVE_PORT:-8000}"
MLFLOW_PORT="${R2RAY_LOCAL_MLFLOW_PORT:-5000}"
S3_PORT="${R2RAY_LOCAL_S3_PORT:-8333}"
WEED_MASTER_PORT="${R2RAY_LOCAL_WEED_MASTER_PORT:-9333}"
WEED_VOLUME_PORT="${R2RAY_LOCAL_WEED_VOLUME_PORT:-9340}"
WEED_FILER_PORT="${R2RAY_LOCAL_WEED_FILER_PORT:-8888}"
WEED_ADMIN_PORT="${R2RAY_LOCAL_WEED_ADMIN_PORT:-23646}"
HAPROXY_METRICS_PORT="${R2RAY_LOCAL_HAPROXY_METRICS_PORT:-9102}"
HAPROXY_STATS_PORT="${R2RAY_LOCAL_HAPROXY_STATS_PORT:-8404}"
WAIT_S="${R2RAY_LOCAL_WAIT_S:-120}"
BUCKETS="${R2RAY_LOCAL_BUCKETS:-backlog routed r2ray-mlflow}"

# The keys Serve accepts (serve/config.yaml: api_key_envs) and sends upstream, as the Secret
# r2ray-api-keys gives them on the cluster.
export R2RAY_API_KEYS="${R2RAY_API_KEYS:-r2ray-local-key}"
export R2RAY_UPSTREAM_API_KEY="${R2RAY_UPSTREAM_API_KEY:-}"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-r2ray-local}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-r2ray-local-secret}"
export R2RAY_S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
export R2RAY_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0

for pidfile in "$DIR"/*.pid; do
    if [ -e "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "up.sh: $(basename "$pidfile" .pid) from an earlier up.sh is still running;" \
            "run infra/local/down.sh first" >&2
        exit 1
    fi
done
mkdir -p "$DIR/logs" "$DIR/s3" "$DIR/mlflow"
# Ray's temp dir holds its sockets, whose paths may not pass 107 bytes: under a deep
# R2RAY_LOCAL_DIR, use a fresh folder in /tmp instead (down.sh removes it).
RAY_TEMP="$DIR/ray"
if [ "${#RAY_TEMP}" -gt 40 ]; then
    RAY_TEMP="$(mktemp -d /tmp/r2ray-ray-XXXXXX)"
    echo "$RAY_TEMP" >"$DIR/ray-temp-dir"
fi
mkdir -p "$RAY_TEMP"

# start NAME CMD...: in a session of its own, so down.sh can find all it spawned
start() {
    local name="$1"
    shift
    setsid "$@" >"$DIR/logs/$name.log" 2>&1 </dev/null &
    echo $! >"$DIR/$name.pid"
}

# wait_for NAME URL: until URL answers 200, the process is gone, or WAIT_S pass
wait_for() {
    local name="$1" url="$2" deadline=$((SECONDS + WAIT_S))
    local probe="import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)"
    until "$PY" -c "$probe" "$url" 2>/dev/null; do
        if ! kill -0 "$(cat "$DIR/$name.pid")" 2>/dev/null; then
            echo "up.sh: $name exited; its log, $DIR/logs/$name.log, ends:" >&2
            tail -n 20 "$DIR/logs/$name.log" >&2
            return 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "up.sh: $name did not answer $url within ${WAIT_S}s; see $DIR/logs/$name.log" >&2
            return 1
        fi
        sleep 0.5
    done
}

fail() {
    echo "up.sh: failed; stopping what started" >&2
    R2RAY_LOCAL_DIR="$DIR" "$REPO/infra/local/down.sh" >&2 || true
    exit 1
}
trap fail ERR

# The three start at once; each is waited for below.
start s3 weed mini -dir="$DIR/s3" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false \
    -master.port="$WEED_MASTER_PORT" -volume.port="$WEED_VOLUME_PORT" \
    -filer.port="$WEED_FILER_PORT" -s3.port="$S3_PORT" -admin.port="$WEED_ADMIN_PORT" \
    -webdav=false

MLFLOW_BACKEND_STORE_URI="sqlite:///$DIR/mlflow/mlflow.db" \
MLFLOW_ARTIFACTS_DESTINATION="s3://r2ray-mlflow/artifacts" \
MLFLOW_S3_ENDPOINT_URL="$R2RAY_S3_ENDPOINT" \
MLFLOW_HOST=127.0.0.1 MLFLOW_PORT="$MLFLOW_PORT" MLFLOW_WORKERS=1 \
    start mlflow bash "$REPO/mlflow/server.sh"

(cd "$REPO" && RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_HAPROXY_METRICS_PORT="$HAPROXY_METRICS_PORT" \
    RAY_SERVE_HAPROXY_STATS_PORT="$HAPROXY_STATS_PORT" \
    start ray ray start --head --block --node-ip-address=127.0.0.1 \
    --port="$RAY_PORT" --ray-client-server-port="$RAY_CLIENT_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --dashboard-agent-listen-port="$DASHBOARD_AGENT_PORT" \
    --num-cpus="${R2RAY_LOCAL_CPUS:-2}" \
    --object-store-memory="${R2RAY_LOCAL_OBJECT_STORE_BYTES:-1000000000}" \
    --temp-dir="$RAY_TEMP" --disable-usage-stats)

# S3 answers before the filer behind it is ready: retry creating the buckets until it works.
deadline=$((SECONDS + WAIT_S))
until "$PY" - "$BUCKETS" 2>"$DIR/logs/buckets.log" <<'EOF'
import os, sys
import s3fs
fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["R2RAY_S3_ENDPOINT"]},
                       skip_instance_cache=True)
for bucket in sys.argv[1].split():
    if not fs.exists(bucket):
        fs.mkdir(bucket)
EOF
do
    kill -0 "$(cat "$DIR/s3.pid")" 2>/dev/null || { tail -n 20 "$DIR/logs/s3.log" >&2; false; }
    [ "$SECONDS" -lt "$deadline" ] || { echo "up.sh: S3 not usable in ${WAIT_S}s" >&2; false; }
    sleep 0.5
done
wait_for mlflow "$R2RAY_TRACKING_URI/health"
wait_for ray "http://127.0.0.1:$DASHBOARD_PORT/api/version"

# What clients need (no RAY_ADDRESS: `ray job submit --address`, as in the README).
cat >"$DIR/env.sh" <<EOF
export R2RAY_TRACKING_URI=$R2RAY_TRACKING_URI
export R2RAY_S3_ENDPOINT=$R2RAY_S3_ENDPOINT
export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID
export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
export RAY_AUTH_MODE=disabled
export RAY_DASHBOARD_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export R2RAY_LOCAL_SERVE_URL=http://127.0.0.1:$SERVE_PORT
export R2RAY_LOCAL_API_KEY=${R2RAY_API_KEYS%%,*}
EOF
# serve/config.yaml for this stack: the pacer reads the nightly runs on this S3, Serve listens
# on 127.0.0.1:SERVE_PORT.
"$PY" -m r2ray.deploy serve-config --config "$REPO/serve/config.yaml" \
    --set applications.r2ray.args.manifest=s3://routed/ \
    --set http_options.host=127.0.0.1 --set "http_options.port=$SERVE_PORT" >"$DIR/serve.yaml"

trap - ERR
cat <<EOF
r2ray local stack up (state and logs in $DIR):
  Ray dashboard and jobs  http://127.0.0.1:$DASHBOARD_PORT
  MLflow                  $R2RAY_TRACKING_URI
  S3 (SeaweedFS)          $R2RAY_S3_ENDPOINT   buckets: $BUCKETS
  Serve (once deployed)   http://127.0.0.1:$SERVE_PORT    serve deploy $DIR/serve.yaml
Clients: source $DIR/env.sh     Stop: infra/local/down.sh
EOF
