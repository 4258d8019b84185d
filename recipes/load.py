"""Loading a recipe: read the YAML, apply `--set key.path=value` overrides, validate against the schema
(recipes/schema.py) and check the files it names, reporting every problem at once, each naming its field."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import yaml
from pydantic import ValidationError

from recipes import files
from recipes.schema import TARGET_TYPES, Recipe, RecipeError, resolve_path


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (SafeLoader silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise DuplicateKey(f"line {key_node.start_mark.line + 1}: key '{key}' is given twice in one "
                                       f"mapping (first on line {seen[key]}); YAML would silently keep the last: "
                                       "remove one")
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
        return super().construct_mapping(node, deep=deep)


class DuplicateKey(yaml.YAMLError):
    pass


def safe_load_unique(text: str):
    """yaml.safe_load, refusing duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _format_errors(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        # a target's type is chosen by its `backend` (a tagged union): pydantic puts the tag in the location
        parts = list(e["loc"])
        backend = next((p for i, p in enumerate(parts) if i > 1 and parts[i - 2] == "targets" and p in TARGET_TYPES),
                       None)
        loc = ".".join(str(p) for p in parts if p != backend) or "(recipe)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "union_tag_invalid":
            loc += ".backend"
            msg = f"got {e['input'].get('backend')!r}: expected one of {', '.join(TARGET_TYPES)}"
        elif e["type"] == "extra_forbidden" and backend:
            msg = (f"not an option of backend {backend} (its options: "
                   f"{', '.join(TARGET_TYPES[backend].model_fields)}; `enginewright schema` lists each backend's)")
        elif e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `enginewright schema` lists the fields)"
        elif e["type"] not in ("missing", "value_error") and isinstance(e.get("input"), (str, int, float, bool)):
            msg = f"got {str(e['input'])[:80]!r}: {msg}"  # name the offending value, not only the allowed ones
        lines.append(f"{loc}: {msg}")
    return lines


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.path=value` overrides; values are parsed as YAML (`gates.latency.ttft_p95_ms=500`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override '{item}': expected key.path=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list) and part.isdigit():
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
        last = parts[-1]
        value = safe_load_unique(raw)
        if isinstance(node, list) and last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value
    return data


def check_files(recipe: Recipe, base_dir: Path) -> list[str]:
    """Files the recipe names must exist now, not an hour into the run."""
    problems = []
    if recipe.model.source in ("hf_dir", "gguf"):
        try:
            path = resolve_path(recipe.model.path, base_dir)  # type: ignore[arg-type]
        except FileNotFoundError as exc:
            problems.append(f"model.path: {exc}")
        else:
            if recipe.model.source == "gguf" and not path.is_file():
                problems.append(f"model.path: GGUF file not found: {path}")
            elif recipe.model.source == "gguf" and (problem := files.gguf_problem(path)):
                problems.append(f"model.path: {problem}")
            if recipe.model.source == "hf_dir" and not (path / "config.json").is_file():
                problems.append(f"model.path: not a Hugging Face checkpoint directory (no config.json): {path}")
            elif recipe.model.source == "hf_dir":
                problems += [f"model.path: {problem}" for problem in files.checkpoint_problems(path)]
    for i, p in enumerate(recipe.calibration.paths):
        path = resolve_path(p, base_dir)
        if not path.is_file():
            problems.append(f"calibration.paths.{i}: file not found: {path}")
        elif path.suffix not in (".jsonl", ".json", ".parquet", ".txt"):
            problems.append(f"calibration.paths.{i}: expected a .jsonl, .json, .parquet or .txt file, got {path.name}")
        elif problem := files.data_file_problem(path):
            problems.append(f"calibration.paths.{i}: {problem}")
    return problems


def load_recipe(path: str | Path, overrides: list[str] | None = None,
                extra_checks: Callable[[Recipe], list[str]] | None = None) -> tuple[Recipe, Path]:
    """Read, override, validate. Returns the recipe and the directory its relative paths resolve against.

    `extra_checks` are checks a higher floor owns (the CLI passes the GPU catalogue's, tasks/decisions/targets.py):
    their problems are listed with the file checks'.

    Raises:
        RecipeError: listing every problem found (schema and missing files), one per line.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} "
                          f"({exc.reason}); save the recipe as UTF-8") from None
    try:
        data = safe_load_unique(text) or {}
    except DuplicateKey as exc:
        raise RecipeError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    base_dir = path.resolve().parent
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{path}: {exc.error_count()} problem(s):\n  " + "\n  ".join(_format_errors(exc))) from None
    problems = check_files(recipe, base_dir) + (extra_checks(recipe) if extra_checks else [])
    if problems:
        raise RecipeError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return recipe, base_dir
