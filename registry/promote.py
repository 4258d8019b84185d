"""Promote: the ladder's choice for a target is registered (its profile's files uploaded to MLflow's artifact store as
an MLflow model, with its tags and a description) and contends for the target's per-architecture alias. Other passing
rungs stay in the run record, not in the registry: only what is promoted is uploaded. Idempotent: a profile already
registered keeps its version."""

from __future__ import annotations

from registry import model_registry
from tasks.decisions import gates, ladder


def version_tags(*, recipe, target, arch: str, profile, decision, run_id: str, latency: dict, lineage: dict,
                 latency_note: str | None = None, extra: dict | None = None) -> dict:
    accuracy = [v for v in decision.verdicts if v.bound is not None]
    return lineage | gates.latency_tags(latency_note, latency) | (extra or {}) | {
        "gpu_arch": arch, "arch_slug": model_registry.arch_slug(arch), "target": target.name,
        "gpu_name": profile.manifest["target"].get("gpu_name") or "none",
        "gpu_memory_gib": profile.manifest["target"].get("gpu_memory_gib"),
        "tp_size": target.tp, "quant_format": profile.format, "quant_algo": profile.manifest.get("quant_algo"),
        "kv_cache_dtype": recipe.quantization.kv_cache, "backend": target.backend,
        "candidate_run_id": run_id,
        # compare_versions reads these as numbers; rounded as people read them (4 significant digits, 0.1 ms)
        "accuracy_degradation": gates.human(accuracy[0].value) if accuracy else None,
        **{f"toolchain.{k}": v for k, v in profile.manifest["toolchain"].items()},
        **{f"gate.{v.gate}": gates.verdict_label(v) for v in decision.verdicts},
        **{f"gate.{v.gate}.statement": gates.statement(v) for v in decision.verdicts},
        **{f"metric.{k}": None if latency.get(k) is None else gates.human(latency[k])
           for k in ladder.HIGHER_IS_BETTER},
        "latency_load": recipe.gated_load, "ladder_strategy": recipe.ladder.strategy,
    }


def describe(recipe, target, arch: str, profile, decision) -> str:
    """The version's description: what was certified, on what, by which gates."""
    deciding = "; ".join(gates.statement(v) for v in decision.verdicts if v.decides)
    reported = "; ".join(gates.statement(v) for v in decision.verdicts if not v.decides)
    device = profile.manifest["target"].get("gpu_name") or arch
    return (f"{recipe.model.slug} quantized to {profile.format} "
            f"({profile.manifest.get('quant_algo') or 'unquantized'}),"
            f" built by the {target.backend} backend for target '{target.name}' on {device} ({arch}, tp "
            f"{target.tp}); certified by recipe '{recipe.name}': {deciding}."
            + (f" Reported, not deciding: {reported}." if reported else "")
            + f" Profile fingerprint {profile.fingerprint}.")


def promote(*, recipe, target, arch: str, passing: list[tuple], choice, lineage: dict) -> list[dict]:
    """passing: (profile, decision, run_id, row) per passing rung; rows get their registry version and alias."""
    if choice.format is None:
        return []
    name = model_registry.registered_name(recipe.registry.name, target.backend)
    outcomes = []
    for profile, decision, run_id, row in passing:
        if profile.format != choice.format:
            continue
        tags = version_tags(recipe=recipe, target=target, arch=arch, profile=profile, decision=decision,
                            run_id=run_id, latency=row["latency"][recipe.gated_load], lineage=lineage,
                            latency_note=row.get("latency_note"), extra=row.get("version_tags"))
        version, _ = model_registry.register_version(name=name, profile_dir=profile.path,
                                               fingerprint=profile.fingerprint, run_id=run_id,
                                               tags=tags | {"profile_path": profile.path},
                                               description=describe(recipe, target, arch, profile, decision))
        row["registry"] = f"{name} v{version}"
        row["model_uri"] = f"models:/{name}/{version}"
        # profile_path is where this host built it; the URI is how any host loads it.
        model_registry.set_version_tags(name, version, {"model_uri": row["model_uri"]})
        outcome = model_registry.promote(
            name=name, version=version, alias=model_registry.alias_for(recipe.registry.alias_prefix, arch, target.tp),
            challenger_alias=model_registry.alias_for("challenger", arch, target.tp),
            compare=lambda cand, champ: ladder.compare_versions(cand, champ, strategy=recipe.ladder.strategy,
                                                                metric=recipe.ladder.metric))
        row["alias"] = f"{outcome['alias']} ({outcome['action']})"
        row["alias_uri"] = f"models:/{name}@{outcome['alias']}"
        outcomes.append({"registered_model": name, "target": target.name, "model_uri": row["model_uri"],
                         "alias_uri": row["alias_uri"], **outcome})
        model_registry.describe_model(name, model_description(name, recipe, model_registry.aliases(name)))
    return outcomes


def model_description(name: str, recipe, aliases: dict[str, str]) -> str:
    """The registered model's description: what it is and which version each alias serves, how to load it."""
    lines = [f"{recipe.model.slug} certified per GPU architecture by enginewright (recipe '{recipe.name}').", ""]
    for alias, version in sorted(aliases.items()):
        lines.append(f"- `{alias}` → version {version}: load `models:/{name}@{alias}`")
    lines += ["", "Each version's description names its gates; resolve one for a GPU with "
                  f"`enginewright resolve {name} --gpu <GPU>`."]
    return "\n".join(lines)
