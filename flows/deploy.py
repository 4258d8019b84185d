"""Deployments of the certify flow, read from prefect.yaml: a schedule per recipe, one deployment per work pool.

Each `deployments:` entry of prefect.yaml names a recipe (`parameters.recipe_path`). Its targets are grouped by the
work pool that has their GPU (`targets[].work_pool`; none: the entry's pool, else `enginewright.default_pool`), and
each group becomes one deployment `<entry>-<pool>` on that pool whose `targets` parameter lists the group. Prefect
routes flow runs, not tasks, to pools, so this is where a target's work meets its GPU. Every deployment keeps the
flow's signature as its parameter schema (the form in the Prefect UI) and the entry's schedules.

The CI webhook (flows/webhook.py) uses the same expansion to find the deployments that follow a model: every
deployment whose recipe's `model.slug` (the recipe's `model.name`, else the file/repository name) is the model.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks.base import settings as names
from tasks.base.settings import settings

PROJECT_DIR = Path(__file__).resolve().parents[1]
FLOW_NAME = "certify"
ENTRYPOINT = "flows/pipeline.py:certify"
QUANTIZE_FLOW, QUANTIZE_ENTRYPOINT = "quantize", "flows/quantize_flow.py:quantize_checkpoints"
SCHEDULE_KEYS = {"cron", "interval", "rrule", "timezone", "anchor_date", "active", "parameters", "slug"}


class DeployError(ValueError):
    """prefect.yaml or a recipe it names cannot be deployed; the message says what to change."""


@dataclass(frozen=True)
class Pool:
    name: str
    gpu: str  # a GPU name, sm_XY, or "none"
    description: str = ""


@dataclass(frozen=True)
class Deployment:
    """One Prefect deployment: a recipe's targets that run on one work pool."""
    name: str
    entry: str
    recipe_path: str
    recipe_name: str
    model: str  # the recipe's model.slug: what a CI webhook names
    pool: str
    targets: list[str]
    parameters: dict[str, Any]
    schedules: list[dict]
    tags: list[str]
    description: str
    job_variables: dict[str, Any] = field(default_factory=dict)
    concurrency_limit: int | None = None
    flow: str = FLOW_NAME
    entrypoint: str = ENTRYPOINT

    @property
    def full_name(self) -> str:
        return f"{self.flow}/{self.name}"


@dataclass(frozen=True)
class Plan:
    pools: dict[str, Pool]
    pull: list[dict]
    deployments: list[Deployment]

    def by_model(self) -> dict[str, list[Deployment]]:
        routes: dict[str, list[Deployment]] = {}
        for d in self.deployments:
            if d.flow == FLOW_NAME:  # quantize deployments are started by certify runs, not by webhooks
                routes.setdefault(d.model, []).append(d)
        return routes


def project_dir() -> Path:
    return Path(settings().project_dir or PROJECT_DIR).resolve()


def enter_project(directory: str | None = None) -> dict[str, str]:
    """Pull step (prefect.yaml `pull:`): run the flow from this worker's project checkout.

    Args:
        directory: the checkout; default ENGINEWRIGHT_PROJECT_DIR, else the checkout this package is installed from.
    """
    path = Path(directory or project_dir())
    if not (path / ENTRYPOINT.partition(":")[0]).is_file():
        raise FileNotFoundError(f"{path} is not an enginewright checkout (no {ENTRYPOINT.partition(':')[0]}); "
                                "set ENGINEWRIGHT_PROJECT_DIR on the worker to the project directory")
    os.chdir(path)
    return {"directory": str(path)}


def load_plan(prefect_file: Path | str | None = None, *, only: list[str] | None = None) -> Plan:
    """Read prefect.yaml and the recipes it names; expand each entry into one deployment per work pool.

    Args:
        prefect_file: default: prefect.yaml in the project directory.
        only: entry names to keep (default: all).

    Raises:
        DeployError: listing every problem found.
    """
    from flows.env import flow_run_env, recipe_needs_hub
    from recipes.load import load_recipe
    from recipes.schema import RecipeError

    path = Path(prefect_file) if prefect_file else project_dir() / "prefect.yaml"
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DeployError(f"cannot read {path}: {exc}") from None
    ours = config.get("enginewright") or {}
    pools = {name: Pool(name, str(spec.get("gpu", "none")), spec.get("description", ""))
             for name, spec in (ours.get("work_pools") or {}).items()}
    default_pool = ours.get("default_pool", "cpu")
    pools.setdefault(default_pool, Pool(default_pool, "none", "default pool"))
    entries = config.get("deployments") or []
    unknown = sorted(set(only or []) - {e.get("name") for e in entries})
    if unknown:
        raise DeployError(f"{path}: no deployment entries named {unknown}")

    problems: list[str] = []
    deployments: list[Deployment] = []
    for i, entry in enumerate(entries):
        name = entry.get("name") or f"deployments.{i}"
        if only and name not in only:
            continue
        where = f"{path.name}: deployment '{name}'"
        if entry.get("entrypoint", ENTRYPOINT) != ENTRYPOINT:
            problems.append(f"{where}: entrypoint must be {ENTRYPOINT}")
            continue
        params = dict(entry.get("parameters") or {})
        if "recipe_path" not in params:
            problems.append(f"{where}: parameters.recipe_path is required")
            continue
        if "targets" in params:
            problems.append(f"{where}: parameters.targets is set per work pool by enginewright deploy; remove it")
            continue
        try:
            recipe, _ = load_recipe(project_dir() / params["recipe_path"], params.get("overrides") or [])
        except RecipeError as exc:
            problems.append(f"{where}: {exc}")
            continue
        schedules, bad = _schedules(entry.get("schedules") or ([entry["schedule"]] if entry.get("schedule") else []))
        problems += [f"{where}: {b}" for b in bad]
        entry_pool = (entry.get("work_pool") or {}).get("name") or default_pool
        groups: dict[str, list[str]] = {}
        for target in recipe.targets:
            pool_name = target.work_pool or entry_pool
            problem = _check_target(target, pools.get(pool_name), pool_name, sorted(pools))
            if problem:
                problems.append(f"{where}: {problem}")
            groups.setdefault(pool_name, []).append(target.name)
        job_variables = dict((entry.get("work_pool") or {}).get("job_variables") or {})
        job_variables["env"] = flow_run_env(offline=not recipe_needs_hub(recipe)) | (job_variables.get("env") or {})
        quantize_pool = recipe.quantization.work_pool
        if quantize_pool:
            if quantize_pool not in pools:
                problems.append(f"{where}: quantization.work_pool '{quantize_pool}' is not defined in "
                                f"enginewright.work_pools (defined: {', '.join(sorted(pools))})")
            quantize = Deployment(
                name=f"{name}-quantize", entry=name, recipe_path=params["recipe_path"], recipe_name=recipe.name,
                model=recipe.model.slug, pool=quantize_pool, targets=[],
                parameters={k: v for k, v in params.items() if k in ("recipe_path", "overrides")}, schedules=[],
                description=f"quantize {params['recipe_path']} on {quantize_pool} for its certify deployments",
                tags=sorted({"enginewright", f"recipe:{recipe.name}", f"model:{recipe.model.slug}",
                             f"pool:{quantize_pool}"}),
                job_variables=job_variables | {"env": job_variables["env"] | {names.WORK_POOL: quantize_pool}},
                flow=QUANTIZE_FLOW, entrypoint=QUANTIZE_ENTRYPOINT)
            deployments.append(quantize)
        for pool_name, targets in groups.items():
            env = job_variables["env"] | {names.WORK_POOL: pool_name}
            if quantize_pool:
                env |= {names.QUANTIZE_DEPLOYMENT: f"{QUANTIZE_FLOW}/{name}-quantize",
                        names.QUANTIZE_POOL: quantize_pool}
            deployments.append(Deployment(
                name=f"{name}-{pool_name}", entry=name, recipe_path=params["recipe_path"], recipe_name=recipe.name,
                model=recipe.model.slug, pool=pool_name, targets=targets, parameters=params | {"targets": targets},
                schedules=schedules, description=entry.get("description") or f"certify {params['recipe_path']}",
                tags=sorted({*(entry.get("tags") or []), "enginewright", f"recipe:{recipe.name}",
                             f"model:{recipe.model.slug}", f"pool:{pool_name}"}),
                job_variables=job_variables | {"env": env}, concurrency_limit=entry.get("concurrency_limit")))
    if problems:
        raise DeployError(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return Plan(pools=pools, pull=config.get("pull") or [{"flows.deploy.enter_project": {}}], deployments=deployments)


def _check_target(target, pool: Pool | None, pool_name: str, known: list[str]) -> str | None:
    from tasks.decisions.targets import arch_of

    if pool is None:
        return (f"target '{target.name}' names work pool '{pool_name}', which enginewright.work_pools does not "
                f"define (defined: {', '.join(known)})")
    if target.gpu == "auto":
        return None
    if pool.gpu == "none":
        return (f"target '{target.name}' needs a {target.gpu} but goes to the CPU pool '{pool_name}': set its "
                f"work_pool to a pool with that GPU ({', '.join(known)})")
    if arch_of(target.gpu) != arch_of(pool.gpu):
        return (f"target '{target.name}' needs {target.gpu} ({arch_of(target.gpu)}) but pool '{pool_name}' has "
                f"{pool.gpu} ({arch_of(pool.gpu)})")
    return None


def _schedules(raw: list) -> tuple[list[dict], list[str]]:
    good, bad = [], []
    for i, spec in enumerate(raw):
        if not isinstance(spec, dict):
            bad.append(f"schedules.{i}: expected a mapping")
            continue
        extra = sorted(set(spec) - SCHEDULE_KEYS)
        kinds = [k for k in ("cron", "interval", "rrule") if spec.get(k) is not None]
        if extra:
            bad.append(f"schedules.{i}: unknown keys {extra} (allowed: {sorted(SCHEDULE_KEYS)})")
        elif len(kinds) != 1:
            bad.append(f"schedules.{i}: set exactly one of cron, interval, rrule")
        else:
            good.append(dict(spec))
    return good, bad


def _schedule_objects(specs: list[dict]):
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import construct_schedule

    return [DeploymentScheduleCreate(
        schedule=construct_schedule(cron=s.get("cron"), interval=s.get("interval"), rrule=s.get("rrule"),
                                    timezone=s.get("timezone"), anchor_date=s.get("anchor_date")),
        active=s.get("active", True), parameters=s.get("parameters") or {}, slug=s.get("slug"))
        for s in specs]


class _PullSteps:
    """What RunnerDeployment calls `storage`: here only the pull steps a worker runs before loading the flow."""

    def __init__(self, steps: list[dict]):
        self.steps = steps
        self._base = Path.cwd()

    def set_base_path(self, path: Path) -> None:
        self._base = path

    @property
    def destination(self) -> Path:
        return self._base

    @property
    def pull_interval(self) -> int | None:
        return None

    async def pull_code(self) -> None:
        return None

    def to_pull_step(self) -> list[dict]:
        return self.steps

    def __eq__(self, other: object) -> bool:
        return self.steps == getattr(other, "steps", None)


def ensure_pools(plan: Plan, names: set[str]) -> list[str]:
    """Create the `process` work pools that do not exist yet; returns the names created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    created = []
    with get_client(sync_client=True) as client:
        for name in sorted(names):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                pool = plan.pools[name]
                description = pool.description or f"enginewright workers with GPU {pool.gpu}"
                try:
                    client.create_work_pool(WorkPoolCreate(name=name, type="process", description=description))
                    created.append(name)
                except ObjectAlreadyExists:  # another deployer made it meanwhile
                    pass
    return created


def apply(plan: Plan) -> list[tuple[Deployment, str]]:
    """Register (create or update) every deployment of the plan on the server at PREFECT_API_URL.

    Returns:
        (deployment, id) pairs.
    """
    from prefect.deployments.runner import RunnerDeployment

    ensure_pools(plan, {d.pool for d in plan.deployments})
    done = []
    with contextlib.chdir(project_dir()):  # the entrypoint is a path relative to the project directory
        for d in plan.deployments:
            deployment = RunnerDeployment.from_entrypoint(
                d.entrypoint, name=d.name, schedules=_schedule_objects(d.schedules), parameters=d.parameters,
                description=d.description, tags=d.tags, work_pool_name=d.pool, job_variables=d.job_variables,
                concurrency_limit=d.concurrency_limit, enforce_parameter_schema=True)
            unknown = sorted(set(d.parameters) - set(deployment._parameter_openapi_schema.properties))
            if unknown:
                raise DeployError(f"deployment '{d.name}': {d.entrypoint} has no parameters {unknown}")
            deployment.storage = _PullSteps(plan.pull)
            done.append((d, str(deployment.apply())))
    return done
