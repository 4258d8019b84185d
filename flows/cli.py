"""The `enginewright` command line: validate, plan, run, resolve, schema (deploy, webhook, cleanup: ops_cli.py)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from recipes.load import load_recipe
from recipes.schema import Recipe, RecipeError
from tasks.base.errors import BadInput, EnginewrightError, NotCertified, Refused
from tasks.base.settings import settings
from tasks.decisions.targets import recipe_gpu_problems

# Exit codes: CI gates on them (README "The command line"); each error class carries its own (tasks/base/errors.py).
EXIT_OK, EXIT_ERROR = 0, EnginewrightError.exit_code
EXIT_BAD_INPUT, EXIT_REFUSED, EXIT_NOT_CERTIFIED = BadInput.exit_code, Refused.exit_code, NotCertified.exit_code
EXIT_CODES_HELP = ("Exit codes: 0 ok (run: every target certified); 1 error (a stage or target crashed); "
                   "2 bad input (recipe, override or argument); 3 refused (resolve --verify: the profile does not "
                   "match this machine); 4 nothing certified (run: no candidate passed every gate on some target; "
                   "resolve: nothing certified for that GPU).")

# Environment each command reads (README "The command line").
ENV_STORE = "ENGINEWRIGHT_HOME (the artifact store and local databases; default ./.enginewright)"
ENV_MLFLOW = "MLFLOW_TRACKING_URI (an MLflow server; default a SQLite file in the store)"
ENV_PREFECT = ("PREFECT_API_URL, PREFECT_API_AUTH_STRING (a Prefect server; default Prefect's temporary local "
               "server)")
ENV_HUB = "HF_TOKEN, HF_HOME (hub models and datasets only)"
ENV_SHARE = "ENGINEWRIGHT_SHARE_ARTIFACTS (auto|0|1: stage outputs through MLflow's artifact store)"


def _env_help(*names: str) -> str:
    return "Environment: " + "; ".join(names) + "."


app = typer.Typer(add_completion=False, no_args_is_help=True,
                  epilog=EXIT_CODES_HELP + "\n\n" + _env_help(ENV_STORE, ENV_MLFLOW, ENV_PREFECT, ENV_HUB),
                  help="Turn an LLM checkpoint into certified, per-GPU-architecture inference artifacts.")
console = Console(width=None if sys.stdout.isatty() else 200)  # data (tables, JSON) on stdout: wide in logs and CI
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)  # messages for people


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"enginewright {version('enginewright')}")
        except PackageNotFoundError:
            print("enginewright (not installed: running from a checkout)")
        raise typer.Exit()


@app.callback()
def main_options(_version_flag: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                                    help="print the version and exit")) -> None:
    """Turn an LLM checkpoint into certified, per-GPU-architecture inference artifacts."""

OVERRIDE_HELP = "Override a recipe field: key.path=value (repeatable), e.g. --set gates.latency.ttft_p95_ms=500"


def _load_with_dir(recipe: Path, overrides: list[str] | None) -> tuple[Recipe, Path]:
    try:
        return load_recipe(recipe, overrides or [], extra_checks=recipe_gpu_problems)
    except RecipeError as exc:
        typer.echo(f"recipe error: {exc}", err=True)
        raise typer.Exit(2) from None


def _load(recipe: Path, overrides: list[str] | None) -> Recipe:
    return _load_with_dir(recipe, overrides)[0]


# \\[: not markup
@app.command(epilog="Example: enginewright validate recipes/demo.yaml --set quantization.formats=\\[fp8]"
                    "\n\nExit 0: valid; 2: not (every problem listed). Environment: none.")
def validate(recipe: Path = typer.Argument(..., help="recipe YAML"),
             set_: Optional[List[str]] = typer.Option(None, "--set", help=OVERRIDE_HELP),
             as_json: bool = typer.Option(False, "--json", help="print the result as JSON on stdout")) -> None:
    """Check a recipe (schema, values, files) without running anything; lists every problem at once."""
    try:
        loaded, _ = load_recipe(recipe, set_ or [], extra_checks=recipe_gpu_problems)
    except RecipeError as exc:
        typer.echo(f"recipe error: {exc}", err=True)
        if as_json:
            print(json.dumps({"recipe": str(recipe), "valid": False, "problems": str(exc).splitlines()}, indent=2))
        raise typer.Exit(EXIT_BAD_INPUT) from None
    warnings = []
    if loaded.model.source == "hub" and not loaded.model.revision:
        warnings.append(f"model.revision is not set: {loaded.model.id} is fetched at whatever the hub has now, so "
                        "its fingerprint (and every cache key after it) changes when the repo does; pin a commit "
                        "sha or tag")
    for w in warnings:
        typer.echo(f"warning: {w}", err=True)
    if as_json:
        print(json.dumps({"recipe": str(recipe), "valid": True, "name": loaded.name, "warnings": warnings,
                          "formats": loaded.quantization.formats, "targets": [t.name for t in loaded.targets],
                          "digest": loaded.digest()}, indent=2))
        return
    console.print(f"[green]ok[/green] {recipe}: {loaded.name}, formats {loaded.quantization.formats}, "
                  f"targets {[t.name for t in loaded.targets]}")


@app.command(epilog="Example: enginewright plan recipes/demo.yaml --json\n\n"
                    + _env_help(ENV_STORE, "PREFECT_API_URL (set: targets with a work_pool count as placed)"))
def plan(recipe: Path = typer.Argument(..., help="recipe YAML"),
         set_: Optional[List[str]] = typer.Option(None, "--set", help=OVERRIDE_HELP),
         as_json: bool = typer.Option(False, "--json", help="print the plan as JSON")) -> None:
    """Show every (format, target) pair that would run, each skipped pair with its reason, and which stages are
    cached and which would rerun and why. Runs nothing heavy."""
    from flows import env

    loaded, base_dir = _load_with_dir(recipe, set_)
    env.configure(offline=not env.recipe_needs_hub(loaded))
    from flows.cache_status import plan_stages
    from tasks.backends import target_runtime
    from tasks.decisions.targets import make_plan
    from tasks.host import machine

    device = machine.local_device()
    result = make_plan(loaded, device, dispatch=bool(settings().prefect_api_url),
                         runtime_of=target_runtime)
    pairs = [{"format": p.format, "target": p.target, "arch": p.arch,
              "action": "skip" if p.skip_reason else "run", "reason": p.skip_reason} for p in result.pairs]
    stages = plan_stages(loaded, base_dir, result, device)
    if as_json:
        print(json.dumps({"recipe": loaded.name, "device": device["arch"], "pairs": pairs, "stages": stages},
                         indent=2))
        return
    table = Table(title=f"plan: {loaded.name}")
    for col in ("format", "target", "arch", "action", "reason"):
        table.add_column(col)
    for p in pairs:
        table.add_row(p["format"], p["target"], p["arch"], p["action"], p["reason"] or "")
    console.print(table)
    cache = Table(title=f"stages on this machine ({device['arch']})")
    for col in ("stage", "subject", "action", "why", "est."):
        cache.add_column(col)
    for s in stages:
        est = s.get("estimate_s")
        cache.add_row(s["stage"], s["subject"], s["action"], s["reason"], "" if est is None else f"~{est:.0f} s")
    console.print(cache)
    known = [s["estimate_s"] for s in stages if s.get("estimate_s") is not None]
    unknown = sum(1 for s in stages if s["action"] == "run" and s.get("estimate_s") is None
                  and s["stage"] not in ("gate", "promote"))
    console.print(f"estimated time: ~{sum(known):.0f} s from this store's recorded stage times"
                  + (f" (+ {unknown} stage(s) never timed here)" if unknown else ""), highlight=False)


@app.command(epilog="Examples:\n\n  enginewright run recipes/demo.yaml\n\n"
                    "  enginewright run recipes/demo.yaml --set "
                    "gates.accuracy.tasks.holdout_perplexity.max_relative_increase=0.05"
                    "\n\n  enginewright run recipes/demo.yaml --json | jq .outcome"
                    "\n\n" + EXIT_CODES_HELP + "\n\n"
                    + _env_help(ENV_STORE, ENV_MLFLOW, ENV_PREFECT, ENV_HUB, ENV_SHARE))
def run(recipe: Path = typer.Argument(..., help="recipe YAML"),
        set_: Optional[List[str]] = typer.Option(None, "--set", help=OVERRIDE_HELP),
        json_out: Optional[Path] = typer.Option(None, "--json-out", help="also write the run record as JSON"),
        as_json: bool = typer.Option(False, "--json", help="print the run record as JSON on stdout (the summary "
                                     "goes to stderr)"),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="print library logs and progress bars too "
                                     "(by default they go to a log file in the home, whose path is printed)")) -> None:
    """Run calibrate -> quantize -> build -> validate -> promote for a recipe, as a Prefect flow.

    Exits 0 only when every target that ran was certified; 4 when some target had no candidate pass every gate.
    """
    import warnings

    from flows import env

    loaded = _load(recipe, set_)
    env.configure(offline=not env.recipe_needs_hub(loaded))
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")  # schema-inference hints
    from flows.console import console_for_run
    from tasks import store

    started = time.perf_counter()
    with console_for_run(store.home(), verbose=verbose):
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        server = _start_temporary_server()  # while the flow's modules import
        from prefect import tags

        from flows.cleanup import cleanup, process_tags
        from flows.ops_cli import report_cleanup
        from flows.pipeline import certify

        if server is not None:
            server.join()  # before anything talks to the API: Prefect's own start() returns at once once it began
        try:  # runs an earlier crash left RUNNING; never a reason not to run
            report_cleanup(cleanup())
        except Exception as exc:  # noqa: BLE001
            logging.getLogger("enginewright").warning("cleanup of abandoned runs skipped: %s: %s",
                                                      type(exc).__name__, exc)
        with tags(*process_tags()):  # the flow run names its process, so a later cleanup can tell it was abandoned
            state = certify(str(recipe), set_ or [], return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, RecipeError):  # found inside the flow, e.g. an unknown target name
        typer.echo(f"recipe error: {result}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    if isinstance(result, BaseException):  # the flow crashed before it had a run record
        raise result
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2, default=str))
    print_summary(result, out=err_console if as_json else console)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    raise typer.Exit(exit_code(result))


def _start_temporary_server():
    """Start Prefect's temporary API server (when no PREFECT_API_URL is set) in a thread, so its start-up overlaps
    the import of the flow's modules instead of following it; returns the thread to join, or None. It is the
    server Prefect's client would start on first use (`SubprocessASGIServer()` is one instance per process), so a
    failure here only means the client starts it later, as before."""
    import os
    import threading

    if settings().prefect_api_url or os.environ.get("PREFECT_API_URL"):
        return None

    def start():
        try:
            from prefect.server.api.server import SubprocessASGIServer

            SubprocessASGIServer().start()
        except Exception as exc:  # noqa: BLE001 - the client retries on first use
            logging.getLogger("enginewright").warning("early start of Prefect's temporary server failed: %s", exc)

    thread = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    thread.start()
    return thread


def exit_code(result: dict) -> int:
    outcome = result.get("outcome")
    if result.get("errors") or outcome == "error":
        return EXIT_ERROR
    return EXIT_NOT_CERTIFIED if outcome == "not_certified" else EXIT_OK


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_summary(result: dict, out: Console | None = None) -> None:
    out = out or console
    from registry.client import ui_command
    from tasks.decisions import gates

    stages = Table(title="stages")
    for col in ("stage", "subject", "time"):
        stages.add_column(col)
    for s in result["stages"]:
        stages.add_row(s["stage"], s["subject"], "cache hit" if s["cached"] else f"{s['seconds']:.1f} s")
    out.print(stages)

    load = result.get("gated_load", "concurrency=1")
    table = Table(title=f"results per format and target (latency at {load})")
    for col in ("format", "target", "perplexity (Δ, worst)", "cloze acc (Δ, worst)", "TTFT p50/p95 ms",
                "TPOT p50/p95 ms",
                "tok/s", "verdict", "registry"):
        table.add_column(col)
    for row in result["rows"]:
        if row["status"] in ("skipped", "not evaluated"):
            table.add_row(row["format"], row["target"], "", "", "", "", "", row["status"], row["reason"])
            continue
        acc, lat = row.get("accuracy", {}), row.get("latency", {}).get(load, {})
        verdicts = {v["gate"]: v for v in row.get("verdicts", [])}
        ppl = acc.get("holdout_perplexity", {}).get("word_perplexity")
        ppl_cell = _fmt(ppl, ".2f")
        if gates.delta_text(verdicts.get("holdout_perplexity", {})):  # Δ: candidate - baseline (gates.delta)
            ppl_cell += f" (Δ {gates.delta_text(verdicts['holdout_perplexity'])})"
        cloze = acc.get("holdout_cloze", {}).get("acc")
        cloze_cell = _fmt(cloze, ".3f")
        if gates.delta_text(verdicts.get("holdout_cloze", {})):
            cloze_cell += f" (Δ {gates.delta_text(verdicts['holdout_cloze'])})"
        verdict = row["status"] if row["status"] != "baseline" else "baseline"
        style = {"pass": "green", "fail": "red", "undecided": "yellow"}.get(verdict, "")
        table.add_row(row["format"], row["target"], ppl_cell, cloze_cell,
                      f"{_fmt(lat.get('ttft_ms_p50'))}/{_fmt(lat.get('ttft_ms_p95'))}",
                      f"{_fmt(lat.get('tpot_ms_p50'))}/{_fmt(lat.get('tpot_ms_p95'))}",
                      _fmt(lat.get("output_tokens_per_s")) + ("*" if row.get("latency_note") else ""),
                      f"[{style}]{verdict}[/{style}]" if style else verdict,
                      " ".join(x for x in (row.get("registry"), row.get("alias")) if x) or "")
    out.print(table)
    if any(r.get("latency_note") for r in result["rows"]):
        out.print("  * reference runtime (fake quantization): not a deployment number; latency shown, not deciding",
                      highlight=False)
    for row in result["rows"]:
        if row["status"] in ("fail", "undecided"):
            out.print(f"  {row['format']}@{row['target']} {row['status']}: {row['reason']}", highlight=False)
        for v in row.get("verdicts", []):
            if not v.get("decides", True):
                out.print(f"  {row['format']}@{row['target']} {gates.statement(v)}", highlight=False)
    for target, decision in result.get("decisions", {}).items():
        out.print(f"decision for {target}: {decision['reason']}", highlight=False)
        if decision.get("latency_note"):
            out.print(f"[yellow]latency on {target} did not decide[/yellow]: {decision['latency_note']}",
                          highlight=False)
    for row in result["rows"]:
        host = row.get("latency", {}).get(load, {}).get("host_load") or {}
        if host and not host.get("reliable"):
            out.print(f"  [yellow]{row['format']}@{row['target']} latency {host['note']}[/yellow]", highlight=False)
    for p in result["promotions"]:
        out.print(f"registry: {p['registered_model']} v{p['version']} -> alias {p['alias']} ({p['action']}); "
                  f"load {p.get('alias_uri') or p.get('model_uri', '')}", highlight=False)
    if not result["promotions"]:
        out.print("[yellow]nothing promoted[/yellow]: no candidate passed every gate")
    for e in result["errors"]:
        out.print(f"[red]error[/red] {e}", highlight=False)
    if "wall_seconds" in result:
        out.print(f"wall time {result['wall_seconds']} s; MLflow run {result['run_id']}")
    if result.get("report"):
        out.print(f"decision report: {result['report']}  (also in the MLflow run under report/)")
    from flows.env import prefect_ui_command

    out.print(f"MLflow UI:  {ui_command()}", highlight=False, soft_wrap=True)
    out.print(f"Prefect UI: {prefect_ui_command()}", highlight=False, soft_wrap=True)


@app.command(epilog="Examples:\n\n  enginewright resolve smollm2-135m-reference --gpu H100\n\n"
                    "  enginewright resolve smollm2-135m-reference --download /srv/models/smollm2 --verify\n\n"
                    + EXIT_CODES_HELP + "\n\n" + _env_help(ENV_STORE, ENV_MLFLOW))
def resolve(model: str = typer.Argument(..., help="registered model name, e.g. smollm2-135m-reference"),
            gpu: str = typer.Option("auto", help="GPU name (H100, H20, A100, ...; a version built on that GPU is "
                                    "preferred to the arch's champion built on another), an arch (sm_90, sm90, "
                                    "cpu-x86_64), or auto (this machine)"),
            tp: int = typer.Option(1, help="tensor-parallel size"),
            prefix: str = typer.Option("champion", help="alias prefix"),
            download: Optional[Path] = typer.Option(None, "--download", help="fetch the version's files from MLflow's "
                                                    "artifact store into this directory (kept if already there) and "
                                                    "check every file's SHA-256"),
            verify: bool = typer.Option(False, "--verify", help="check the profile's files against their digests "
                                        "(this host's copy: --download DIR, the store's build, or a download into "
                                        "ENGINEWRIGHT_HOME/downloads) and that it was built for this machine's arch "
                                        "and toolchain"),
            fast: bool = typer.Option(False, "--fast", help="with --verify/--download: check presence and sizes only"),
            as_json: bool = typer.Option(True, "--json", hidden=True, help="the answer is always JSON on stdout")
            ) -> None:
    """Which registry version a node with this GPU should serve, its models:/ URI, and (with --download/--verify)
    a verified copy of its files on this host (JSON on stdout; messages on stderr). Exit 2: unknown model or GPU;
    3: refused (a file differs from its digest, or another arch/toolchain); 4: nothing certified for that GPU."""
    from flows import env

    env.configure(offline=True)
    from registry import model_registry
    from registry.model_registry import UnknownModel
    from tasks import store
    from tasks.base.errors import exit_code_of
    from tasks.profiles.profile import verify_artifact

    try:
        arch = _arch_of(gpu)
    except ValueError as exc:
        typer.echo(f"--gpu: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    try:
        answer = model_registry.resolve(name=model, arch=arch, prefix=prefix, tp=tp, gpu_name=_gpu_name_of(gpu))
    except (UnknownModel, NotCertified) as exc:  # exit 2 and 4 (tasks/base/errors.py)
        typer.echo(str(exc), err=True)
        raise typer.Exit(exit_code_of(exc)) from None
    if download or verify:
        checks = {"full": not fast, "sizes_only": fast}
        try:
            local = answer["local_profile"]
            if download is None and local:  # this host built the very artifact registered (resolve checked)
                profile = Path(local)
                store.check(profile, **checks)
            else:
                dest = download or store.home() / "downloads" / model / f"v{answer['version']}"
                profile = model_registry.download(model, answer["version"], dest, **checks)
            answer["profile_dir"] = str(profile)
            answer["files_checked"] = "sizes" if fast else "sha256"
            if verify:
                from tasks.host import machine

                verify_artifact(profile, full=False, sizes_only=True)  # digests done above; now arch and toolchain
                answer["verified_on"] = machine.local_device()["arch"]
        except Refused as exc:  # ArtifactDamaged, ArtifactMismatch: exit 3
            typer.echo(f"refused: {exc}", err=True)
            raise typer.Exit(exit_code_of(exc)) from None
    print(json.dumps(answer, indent=2))


def _gpu_name_of(gpu: str) -> str | None:
    """A catalogue GPU name (H20, H100, ...) when --gpu is one: resolve then prefers a version built on that GPU."""
    from tasks.decisions.targets import GPU_CATALOGUE

    return next((name for name in GPU_CATALOGUE if name.lower() == gpu.lower()), None)


def _arch_of(gpu: str) -> str:
    """--gpu as an arch: auto, a catalogue GPU name, or an arch in either spelling (sm_90/sm90, cpu-x86_64/cpu-x86-64;
    aliases use the second, manifests and the gpu_arch tag the first, and both name the same alias)."""
    import re

    from tasks.decisions.targets import arch_of
    from tasks.host import machine

    if gpu == "auto":
        return machine.local_device()["arch"]
    if re.fullmatch(r"sm\d{2,3}", gpu):
        return f"sm_{gpu[2:]}"
    if re.fullmatch(r"cpu-[a-z0-9_-]+", gpu):
        return gpu
    return arch_of(gpu)


@app.command()
def schema() -> None:
    """Print the recipe JSON schema (every field, with its description)."""
    print(json.dumps(Recipe.model_json_schema(), indent=2))


__import__("flows.ops_cli").ops_cli.register(app)  # production commands: deploy, webhook serve


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
