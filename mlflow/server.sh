#!/usr/bin/env bash
# Production tracking server: a database for runs and the registry, S3 for artifacts.
#
#   MLFLOW_BACKEND_STORE_URI   e.g. postgresql://mlflow:PASSWORD@db:5432/mlflow  (required)
#   MLFLOW_ARTIFACTS_DESTINATION  e.g. s3://r2ray-mlflow/artifacts            (required)
#   MLFLOW_S3_ENDPOINT_URL     S3-compatible endpoint (MinIO, SeaweedFS); unset for AWS
#   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY   read by the server only; clients never need them
#   MLFLOW_HOST (0.0.0.0), MLFLOW_PORT (5000), MLFLOW_WORKERS (4)
#   MLFLOW_ALLOWED_HOSTS       Host headers to accept besides localhost and private IPs,
#                              e.g. mlflow.example.com (MLflow's DNS-rebinding guard)
#
# Clients then set R2RAY_TRACKING_URI=http://HOST:PORT; artifacts are proxied by the server
# (--serve-artifacts), so training jobs and Serve replicas need no S3 credentials.
set -euo pipefail
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (a SQLAlchemy database URI)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (an s3:// prefix)}"

extra=()
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then extra+=(--allowed-hosts "${MLFLOW_ALLOWED_HOSTS}"); fi

exec mlflow server \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION}" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-0.0.0.0}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-4}" \
  "${extra[@]}"
