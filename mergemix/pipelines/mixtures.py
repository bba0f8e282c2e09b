"""The proposed mixture for the trainer that mid-trains on it: files its configuration reads, and a dataset.

`write_mixture(run, format)` writes, atomically and beside proposal.json:
- `megatron`: `megatron_data_path.txt`, Megatron-LM's `--data-path` argument (weight, data prefix, ...; each
  domain's prefix is `data.domains[].megatron_prefix`, default its name);
- `json` / `yaml`: `mixture.json` / `mixture.yaml`, per domain its weight, tokens, epochs and available tokens
  and the total budget, for OLMo-core, torchtitan or any config of your own.

`mixture_dataset(run)` is a Hugging Face `datasets` IterableDataset of the domains' documents, drawn at the
proposal's ratios (`interleave_datasets`), each domain repeated at most its proposed epochs.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

import yaml

from mergemix.artifacts import read_json, write_text
from mergemix.data.prepare import load_domain
from mergemix.errors import MergemixError
from mergemix.pipelines.export import resolve_run
from mergemix.proposal import Proposal
from mergemix.recipe import Recipe

FORMATS = {"megatron": "megatron_data_path.txt", "json": "mixture.json", "yaml": "mixture.yaml"}


def read_proposal(recipe: Recipe) -> Proposal:
    """The run's proposal.json; a run without one is a one-line error."""
    path = recipe.resolved_run_dir() / "proposal.json"
    if not path.exists():
        raise MergemixError(f"{path}: not found; run mergemix propose first")
    return Proposal.model_validate(read_json(path))


def mixture_record(proposal: Proposal) -> dict[str, Any]:
    """The mixture as plain data: the budget and, per domain, weight (= ratio), tokens, epochs, available."""
    return {"name": proposal.name, "total_tokens": proposal.total_tokens,
            "domains": {s.domain: {"weight": s.ratio, "tokens": s.tokens, "epochs": s.epochs,
                                   "available_tokens": s.available_tokens} for s in proposal.mixture}}


def megatron_data_path(proposal: Proposal, recipe: Recipe) -> str:
    """`--data-path W1 PREFIX1 W2 PREFIX2 ...` over the domains the mixture uses (weight > 0)."""
    prefixes = {d.name: d.megatron_prefix or d.name for d in recipe.data.domains}
    parts = [f"{s.ratio:.6g} {shlex.quote(prefixes[s.domain])}" for s in proposal.mixture if s.ratio > 0]
    return "--data-path " + " ".join(parts)


def write_mixture(run_or_recipe: str | Path, fmt: str) -> Path:
    """Write the run's mixture in format `fmt` (megatron, json, yaml) beside its proposal.json; return the path."""
    if fmt not in FORMATS:
        raise MergemixError(f"--format {fmt}: one of model, {', '.join(FORMATS)}")
    recipe = resolve_run(run_or_recipe)
    proposal = read_proposal(recipe)
    out = recipe.resolved_run_dir() / FORMATS[fmt]
    if fmt == "megatron":
        text = megatron_data_path(proposal, recipe) + "\n"
    elif fmt == "json":
        text = json.dumps(mixture_record(proposal), indent=2) + "\n"
    else:
        text = yaml.safe_dump(mixture_record(proposal), sort_keys=False)
    write_text(out, text)
    return out


def mixture_dataset(run_or_recipe: str | Path, seed: int = 0) -> Any:  # -> datasets.IterableDataset
    """The domains' documents as the recipe reads them (deduplicated, within max_chars; every pool) as one
    IterableDataset (`text`, `domain`), drawn at the proposal's ratios. A document is drawn with
    probability ∝ its domain's ratio / the domain's mean document length, so the characters drawn follow
    the ratios; each domain's stream is its documents repeated up to its proposed epochs, and the dataset
    ends when the first stream does (a domain is never repeated beyond its cap). Domains of ratio 0 are
    left out.
    """
    from datasets import Dataset, concatenate_datasets, interleave_datasets

    recipe = resolve_run(run_or_recipe)
    proposal = read_proposal(recipe)
    specs = {d.name: d for d in recipe.data.domains}
    cache = recipe.resolved_cache_dir()
    streams, weights = [], []
    for share in proposal.mixture:
        if share.ratio <= 0:
            continue
        pools = load_domain(specs[share.domain], recipe.data.split, recipe.seed, cache).pools
        texts = [t for pool in pools.values() for t in pool]
        docs = Dataset.from_dict({"text": texts, "domain": [share.domain] * len(texts)})
        cap = max(1, math.floor(share.epochs * len(texts)))  # documents in its stream: `epochs` passes
        stream = concatenate_datasets([docs] * math.ceil(cap / len(texts))).select(range(cap))
        streams.append(stream.shuffle(seed=seed).to_iterable_dataset())
        weights.append(share.ratio / (sum(len(t) for t in texts) / len(texts)))
    probabilities = [w / sum(weights) for w in weights]
    return interleave_datasets(streams, probabilities=probabilities, seed=seed, stopping_strategy="first_exhausted")
