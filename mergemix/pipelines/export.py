"""`mergemix export`: the merge of a run's experts at one α, as a Hugging Face directory and a mergekit YAML.

The directory loads with `AutoModelForCausalLM.from_pretrained`; `mergekit.yaml` in it describes the same
merge for `mergekit-yaml` (expert directories get the base's config.json so mergekit can read them).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from mergemix.artifacts import atomic_path, read_json, read_jsonl, stable_hash
from mergemix.catalog import MERGE_METHODS
from mergemix.errors import MergemixError
from mergemix.merge.inplace import InPlaceMerger
from mergemix.merge.replay import merge_weights
from mergemix.pipelines.propose import expert_stage
from mergemix.recipe import MergeSpec, Recipe, load_recipe
from mergemix.run.experts import LORA
from mergemix.run.scoring import replay_of
from mergemix.run.workspace import open_workspace

log = logging.getLogger(__name__)

MERGEKIT_YAML = "mergekit.yaml"


@dataclass(frozen=True)
class Exported:
    path: Path
    alpha: dict[str, float]


def resolve_run(run_or_recipe: str | Path) -> Recipe:
    """The recipe of a run directory (its recipe.resolved.yaml, run_dir pointed at it) or of a recipe file."""
    path = Path(run_or_recipe)
    if path.is_dir():
        resolved = path / "recipe.resolved.yaml"
        if not resolved.exists():
            raise MergemixError(f"{path}: no recipe.resolved.yaml; give a run directory or a recipe file")
        return load_recipe(resolved, [f"run_dir={path}"])
    return load_recipe(path)


def parse_alpha(text: str, recipe: Recipe) -> dict[str, float]:
    """`proposal` (α* of proposal.json), `best` (the best-scoring trial of the proposal's run) or explicit
    weights `code=0.4,prose=0.6` (unnamed domains get 0; weights are used as given)."""
    run = recipe.resolved_run_dir()
    names = recipe.domain_names
    if text in ("proposal", "best"):
        proposal_path = run / "proposal.json"
        if not proposal_path.exists():
            raise MergemixError(f"--alpha {text}: {proposal_path} not found; run mergemix propose first")
        star = read_json(proposal_path)["alpha_star"]
        if text == "proposal":
            return {d: float(star[d]) for d in names}
        trials = read_jsonl(run / "trials.jsonl")
        keys = {t["eval_key"] for t in trials if t["alpha"] == star}
        scored = [t for t in trials if t["eval_key"] in keys and t["kind"] != "base" and "objective" in t]
        if not scored:
            raise MergemixError(f"--alpha best: no scored trial of the proposal in {run / 'trials.jsonl'}")
        best = max(scored, key=lambda t: t["objective"])
        return {d: float(best["alpha"][d]) for d in names}
    alpha = {d: 0.0 for d in names}
    for item in text.split(","):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or name not in alpha:
            raise MergemixError(f"--alpha {text!r}: expected proposal, best or DOMAIN=WEIGHT,... with domains "
                                f"{', '.join(names)}; got {item!r}")
        try:
            alpha[name] = float(value)
        except ValueError:
            raise MergemixError(f"--alpha: {item!r}: {value!r} is not a number") from None
    return alpha


LORA_NOTE = ("# LoRA experts are BASE+ADAPTER: mergekit merges each adapter into the base first, which needs a\n"
             "# cache directory: mergekit-yaml mergekit.yaml OUT --lora-merge-cache CACHE_DIR\n")


def mergekit_model(base: Path, folder: Path, lora: bool) -> str:
    """How mergekit names an expert: its directory (given the base's config.json, which mergekit reads from
    it; training saves only weights), or for a peft LoRA adapter `BASE+ADAPTER`, which mergekit merges into
    the base with peft before merging models."""
    if lora:
        return f"{base}+{folder}"
    if not (folder / "config.json").exists():
        shutil.copyfile(base / "config.json", folder / "config.json")
    return str(folder)


def mergekit_config(spec: MergeSpec, base: Path, experts: dict[str, str], alpha: dict[str, float],
                    dtype: str) -> dict:
    """The mergekit (0.1.5) configuration of the same merge: method, weights, density and flags."""
    method = MERGE_METHODS.get(spec.method)
    per_model: dict[str, float] = {}
    params: dict[str, object] = {}
    if method.sparsify is not None:
        per_model["density"] = spec.density
        params["rescale"] = method.rescale if spec.rescale is None else spec.rescale
    if spec.normalize is not None:
        params["normalize"] = spec.normalize
    if spec.scale != 1:
        params["lambda"] = spec.scale
    config = {
        "merge_method": method.mergekit,
        "base_model": str(base),
        "models": [{"model": experts[d], "parameters": {"weight": a, **per_model}} for d, a in alpha.items()],
        "dtype": dtype,
    }
    if params:
        config["parameters"] = params
    return config


def export(run_or_recipe: str | Path, alpha_text: str = "proposal", out: str | Path | None = None) -> Exported:
    """Merge the run's experts for mixture α (at its merge weights: α itself without replay) and write `out`
    (default RUN/export/LABEL-HASH): the model and tokenizer as a Hugging Face directory, `mergemix.json` (α
    and the weights) and `mergekit.yaml`."""
    recipe = resolve_run(run_or_recipe)
    alpha = parse_alpha(alpha_text, recipe)
    ws = open_workspace(recipe)
    experts = {e.domain: e for e in expert_stage(ws, train=False)}
    dirs = {d: e.path.resolve() for d, e in experts.items()}
    keys = [e.key for e in experts.values()]
    label = alpha_text if alpha_text in ("proposal", "best") else "alpha"
    target = Path(out) if out else ws.run_dir / "export" / (
        f"{label}-{stable_hash([keys, recipe.merge.key(), alpha], 8)}")
    states = {d: e.state() for d, e in experts.items()}
    # α is a mixture; with replay its merge weights differ from it (mergemix.merge.replay)
    weights = dict(zip(recipe.domain_names, merge_weights(replay_of(ws), [alpha[d] for d in recipe.domain_names]),
                       strict=True))
    InPlaceMerger(ws.model, states, recipe.merge, recipe.seed).apply(list(weights.values()))
    base = Path(ws.base_path).resolve()
    models = {d: mergekit_model(base, folder, experts[d].manifest.get("kind") == LORA) for d, folder in dirs.items()}
    config = mergekit_config(recipe.merge, base, models, weights, recipe.base.dtype)
    note = "" if recipe.merge.sign == "sum" else "# mergekit 0.1.5 elects signs by sum; this run used count\n"
    if any("+" in m for m in models.values()):
        note += LORA_NOTE
    if target.exists() and any(target.iterdir()):
        raise MergemixError(f"{target}: exists and is not empty; remove it or give another --out")
    info = {"alpha": alpha, "weights": weights, "merge": recipe.merge.model_dump(mode="json"), "experts": keys}
    with atomic_path(target) as tmp:  # the whole directory appears at once, or not at all
        tmp.unlink()
        ws.model.save_pretrained(tmp)
        ws.tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
        (tmp / "mergemix.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        (tmp / MERGEKIT_YAML).write_text(note + yaml.safe_dump(config, sort_keys=False))
    log.info("exported the merge at %s to %s", alpha, target)
    return Exported(target, alpha)
