# MLflow tracking server with the Postgres driver the official image lacks (mlflow/mlflow#9513).
ARG MLFLOW_VERSION=v3.17.2
FROM ghcr.io/mlflow/mlflow:${MLFLOW_VERSION}
RUN pip install --no-cache-dir "psycopg2-binary>=2.9"
