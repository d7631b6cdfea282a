#!/usr/bin/env bash
# Stops what infra/local/up.sh started, and nothing else: each service was started as the leader
# of a session of its own, so its processes are that leader's descendants or members of its
# session (Ray's raylet, GCS, dashboard, workers, job drivers and Serve replicas; MLflow's
# workers; SeaweedFS). SIGTERM, then SIGKILL to any left after R2RAY_LOCAL_STOP_S [5] seconds
# (Ray's and MLflow's processes often outlast a SIGTERM by many seconds; the state that matters,
# runs and artifacts, is already in the database and on S3).
# Keeps the data (R2RAY_LOCAL_DIR [.r2ray/local]); delete that folder to start afresh.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="${R2RAY_LOCAL_DIR:-$REPO/.r2ray/local}"
PY="${R2RAY_PYTHON:-$REPO/.venv/bin/python}"

pids=()
for name in ray mlflow s3; do
    if [ -f "$DIR/$name.pid" ]; then
        pids+=("$(cat "$DIR/$name.pid")")
    fi
done
if [ "${#pids[@]}" -eq 0 ]; then
    echo "down.sh: nothing to stop in $DIR"
    exit 0
fi

"$PY" - "${R2RAY_LOCAL_STOP_S:-5}" "${pids[@]}" <<'EOF'
import os
import sys

import psutil



def name(proc):
    try:
        return proc.name()
    except psutil.Error:
        return str(proc.pid)


grace_s, leaders = float(sys.argv[1]), [int(p) for p in sys.argv[2:]]
found = {}
for pid in leaders:
    try:
        leader = psutil.Process(pid)
        found.update({p.pid: p for p in [leader, *leader.children(recursive=True)]})
    except psutil.NoSuchProcess:
        pass
for proc in psutil.process_iter():  # members whose parent already died (re-parented)
    try:
        if os.getsid(proc.pid) in leaders:
            found[proc.pid] = proc
    except (ProcessLookupError, PermissionError, psutil.Error):
        pass
for proc in found.values():
    try:
        proc.terminate()
    except psutil.NoSuchProcess:
        pass
_, alive = psutil.wait_procs(list(found.values()), timeout=grace_s)
if alive:
    print(f"down.sh: {len(alive)} still running after {grace_s:g} s, killing: "
          + ", ".join(sorted({name(p) for p in alive})))
for proc in alive:
    try:
        proc.kill()
    except psutil.NoSuchProcess:
        pass
_, alive = psutil.wait_procs(alive, timeout=10)
print(f"down.sh: stopped {len(found)} processes"
      + (f"; {len(alive)} would not die: {[p.pid for p in alive]}" if alive else ""))
sys.exit(1 if alive else 0)
EOF
rm -f "$DIR/ray.pid" "$DIR/mlflow.pid" "$DIR/s3.pid"
if [ -f "$DIR/ray-temp-dir" ]; then  # the /tmp folder up.sh made for Ray's sockets
    temp="$(cat "$DIR/ray-temp-dir")"
    case "$temp" in /tmp/r2ray-ray-?*) rm -rf "$temp" ;; esac
    rm -f "$DIR/ray-temp-dir"
fi
