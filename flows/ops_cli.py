"""Production commands, added to the `enginewright` CLI by flows/cli.py: `deploy`, `webhook serve`, `cleanup`,
`verify-store`, `warmup`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from tasks.base.settings import settings

console = Console(width=None if sys.stdout.isatty() else 200)
PREFECT_FILE_HELP = "the deployments file (default: prefect.yaml in the project directory)"


def deploy(prefect_file: Optional[Path] = typer.Option(None, "--prefect-file", help=PREFECT_FILE_HELP),
           name: Optional[List[str]] = typer.Option(None, "--name", "-n", help="deploy only this entry (repeatable)"),
           dry_run: bool = typer.Option(False, "--dry-run", help="print the deployments; register nothing")) -> None:
    """Register the certify flow's deployments (schedule, parameter form, work pool per GPU type) on a Prefect server.

    Each prefect.yaml entry becomes one deployment per work pool its recipe's targets use. Needs PREFECT_API_URL.
    """
    from flows import env
    from flows.deploy import DeployError, apply, load_plan

    env.configure(offline=True)
    try:
        plan = load_plan(prefect_file, only=name or None)
    except DeployError as exc:
        typer.echo(f"deploy error: {exc}", err=True)
        raise typer.Exit(2) from None
    table = Table(title="deployments")
    for col in ("deployment", "recipe", "model", "work pool", "targets", "schedules"):
        table.add_column(col)
    for d in plan.deployments:
        schedules = ", ".join(s.get("cron") or str(s.get("interval") or s.get("rrule")) for s in d.schedules)
        table.add_row(d.full_name, d.recipe_path, d.model, d.pool, ", ".join(d.targets), schedules or "-")
    console.print(table)
    if dry_run:
        return
    if not settings().prefect_api_url:
        typer.echo("deploy error: PREFECT_API_URL is not set. Deployments need a Prefect server (the temporary "
                   "local API runs no scheduler and no workers), e.g. PREFECT_API_URL=http://127.0.0.1:4200/api",
                   err=True)
        raise typer.Exit(2)
    try:
        done = apply(plan)
    except DeployError as exc:
        typer.echo(f"deploy error: {exc}", err=True)
        raise typer.Exit(2) from None
    for d, deployment_id in done:
        console.print(f"[green]deployed[/green] {d.full_name} ({deployment_id}) -> pool {d.pool}")
    pools = sorted({d.pool for d in plan.deployments})
    console.print("Start a worker per pool on hosts with that GPU, e.g. " +
                  "; ".join(f"prefect worker start --pool {p}" for p in pools))


def serve(host: str = typer.Option("127.0.0.1", help="address to bind (0.0.0.0 inside a container)"),
          port: int = typer.Option(8088, help="port to listen on"),
          prefect_file: Optional[Path] = typer.Option(None, "--prefect-file", help=PREFECT_FILE_HELP)) -> None:
    """Receive signed CI webhooks ("model X has version V at L") and start the deployments that follow model X.

    Needs PREFECT_API_URL and ENGINEWRIGHT_WEBHOOK_SECRET. See flows/webhook.py for the request format.
    """
    from flows import env
    from flows.deploy import DeployError
    from flows.webhook import serve as run_server

    env.configure(offline=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        run_server(host=host, port=port, prefect_file=prefect_file)
    except (DeployError, ValueError) as exc:
        typer.echo(f"webhook error: {exc}", err=True)
        raise typer.Exit(2) from None


def report_cleanup(marked: dict[str, list[dict]]) -> None:
    console = Console(stderr=True)  # messages, not data: `run --json | jq` reads stdout
    for run in marked["mlflow_runs"]:
        console.print(f"MLflow run {run['run_id']} ({run['name']}) marked FAILED: {run['reason']}", highlight=False)
    for run in marked["flow_runs"]:
        console.print(f"Prefect flow run {run['flow_run_id']} ({run['name']}) marked Crashed: {run['reason']}",
                      highlight=False)
    for server in marked["servers"]:
        console.print(f"stopped {server['what']} (pid {server['pid']}) of home {server['home']}, left by a killed run: "
                      f"{server['reason']}", highlight=False)


def cleanup() -> None:
    """Mark runs that a crash left RUNNING on this host (MLflow runs, Prefect flow runs) as failed, and stop the
    temporary Prefect server a killed run left behind.

    `enginewright run` does this before it starts; this command does it alone. Only runs whose recorded process on
    this host is gone are touched.
    """
    from flows import env
    from flows.cleanup import cleanup as mark_abandoned

    env.configure(offline=True)
    marked = mark_abandoned()
    report_cleanup(marked)
    console.print(f"cleanup: {len(marked['mlflow_runs'])} MLflow run(s), {len(marked['flow_runs'])} Prefect flow "
                  f"run(s) marked, {len(marked['servers'])} orphaned temporary server(s) stopped")


def verify_store() -> None:
    """Hash every file of every stage output in the store again, in full, and name the damaged ones (exit 3 if any).

    Reuse hashes a file again only when it was written to since it was hashed (its ctime changed); bytes that change
    without a write (bit rot) are found only here. Run it on a schedule, or after a disk or controller error.
    """
    import time

    from tasks import store
    from tasks.base.errors import Refused

    started = time.perf_counter()
    results = store.verify_store()
    damaged = {entry: problems for entry, problems in results.items() if problems}
    size = sum(meta["size"] for entry in results
               for meta in (store.read_manifest(entry) or {}).get("files", {}).values())
    err = Console(stderr=True)
    for entry, problems in damaged.items():
        err.print(f"damaged: {entry}", highlight=False)
        for problem in problems:
            err.print(f"  {entry / problem.partition(':')[0]}: {problem.partition(':')[2].strip()}", highlight=False)
    console.print(f"verify-store: {len(results)} entr{'y' if len(results) == 1 else 'ies'} of {store.home()}, "
                  f"{size / 1e9:.2f} GB hashed in {time.perf_counter() - started:.1f} s; {len(damaged)} damaged"
                  + (" (reuse removes and rebuilds a damaged entry; or delete it now)" if damaged else ""),
                  highlight=False)
    if damaged:
        raise typer.Exit(Refused.exit_code)


def warmup() -> None:
    """Compile ModelOpt's CUDA extensions for this GPU now, ahead of work (about a minute each, in parallel).

    Run it once per GPU worker, when it starts (the GPU worker image does): otherwise the first quantize stage on the
    worker compiles them. They are kept in TORCH_EXTENSIONS_DIR (a volume in the image). Exit code 2 without a GPU.
    """
    import json

    from tasks.models.warmup import warmup as compile_extensions

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        result = compile_extensions()
    except RuntimeError as exc:
        typer.echo(f"warmup error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result, indent=1))
    if not all(r["loaded"] for r in result.values()):
        typer.echo("warmup: some extensions did not build (see the log above); ModelOpt falls back to slower "
                   "paths for them", err=True)


def register(app: typer.Typer) -> None:
    """Add `deploy`, `webhook serve`, `cleanup`, `verify-store` and `warmup` to the CLI."""
    app.command(
        epilog="Example (GPU worker start): enginewright warmup && prefect worker start --pool gpu-h100")(warmup)
    app.command(epilog="Example: PREFECT_API_URL=http://127.0.0.1:4200/api enginewright deploy")(deploy)
    app.command(epilog="Example: enginewright cleanup")(cleanup)
    app.command("verify-store", epilog="Example: ENGINEWRIGHT_HOME=/srv/enginewright enginewright verify-store")(
        verify_store)
    webhook = typer.Typer(no_args_is_help=True, help="The CI webhook receiver.")
    webhook.command("serve", epilog="Example: ENGINEWRIGHT_WEBHOOK_SECRET=... PREFECT_API_URL=... "
                                    "enginewright webhook serve --port 8088")(serve)
    app.add_typer(webhook, name="webhook")
