# Prefect server with SQLAlchemy < 2.1: on 2.1, Prefect 3.8's scheduler fails every cycle ("Can't evaluate bulk DML
# statement" in _insert_scheduled_flow_runs) and schedules never create runs. Same pin as pyproject.toml.
ARG PREFECT_IMAGE=prefecthq/prefect:3.8.8-python3.11
FROM ${PREFECT_IMAGE}
RUN pip install --no-cache-dir "sqlalchemy>=2.0,<2.1"
