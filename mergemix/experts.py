"""Train (or reuse) one expert per domain from the shared base.

An expert's directory holds `model.safetensors` (its parameters) and `manifest.json` (what it was trained
from and how, plus its loss curve). The manifest's `key` hashes every input: base, data, recipe fields,
seed. An expert whose key matches is reused; one whose training was killed resumes from its checkpoint.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mergemix.artifacts import atomic_path, read_json, stable_hash, write_json
from mergemix.data.prepare import DomainBlocks
from mergemix.errors import MergemixError
from mergemix.recipe import Recipe
from mergemix.train import Sampler, TrainConfig, make_accelerator, remove_checkpoint, train

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Expert:
    domain: str
    path: Path
    key: str
    manifest: dict

    def state(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / MODEL_FILE))


def expert_key(recipe: Recipe, base_hash: str, blocks: dict[str, DomainBlocks], domain: str) -> str:
    """Hash of everything an expert's weights depend on. Replay mixes all domains in, so their hashes count
    too. How the budget was written (steps or tokens) and checkpoint_every do not change the result."""
    spec = recipe.experts
    data = [blocks[domain].content_hash] + (
        [blocks[d].content_hash for d in sorted(blocks)] if spec.replay > 0 else []
    )
    training = spec.model_dump(mode="json", exclude={"steps", "tokens", "checkpoint_every"})
    return stable_hash([base_hash, data, training, spec.num_steps(recipe.data.seq_len), recipe.data.seq_len,
                        _seed(recipe.seed, domain), domain])


def _seed(seed: int, domain: str) -> int:
    """Sampling seed of one expert: from its name, so adding or reordering domains leaves the others alone."""
    return int(stable_hash([seed, domain]), 16) % 2**31


def general_probs(blocks: dict[str, DomainBlocks], names: list[str]) -> tuple[float, ...]:
    """Token proportions of the domains: the 'general data' mix used for replay and as the prior."""
    total = sum(blocks[n].n_tokens for n in names)
    return tuple(blocks[n].n_tokens / total for n in names)


def train_experts(
    recipe: Recipe,
    base: torch.nn.Module,
    base_hash: str,
    blocks: dict[str, DomainBlocks],
    run_dir: Path,
    reuse_only: bool = False,
) -> list[Expert]:
    """One expert per domain, in recipe order; unchanged experts are reused, interrupted ones resumed.
    With `reuse_only` a missing or outdated expert is an error (`mergemix search` trains nothing)."""
    spec = recipe.experts
    names = recipe.domain_names
    steps = spec.num_steps(recipe.data.seq_len)
    own_rows = spec.batch_size - round(spec.replay * spec.batch_size)
    general = sorted(names)  # the replay mix, in an order that does not depend on the recipe's
    pools = tuple(blocks[n].blocks["expert"] for n in general)
    probs = general_probs(blocks, general)
    accelerator = make_accelerator(recipe.device)
    experts = []
    for name in names:
        out = run_dir / "experts" / name
        key = expert_key(recipe, base_hash, blocks, name)
        manifest_path = out / MANIFEST
        if manifest_path.exists() and (out / MODEL_FILE).exists():
            manifest = read_json(manifest_path)
            if manifest.get("key") == key:
                log.info("expert %s: reusing %s", name, out)
                experts.append(Expert(name, out, key, manifest))
                continue
        if reuse_only:
            raise MergemixError(f"expert {name}: no expert for this recipe in {out}; run mergemix propose RECIPE "
                                "first (mergemix search only searches over existing experts)")
        out.mkdir(parents=True, exist_ok=True)
        manifest_path.unlink(missing_ok=True)  # weights and manifest must never disagree after a kill
        model = copy.deepcopy(base)
        sampler = Sampler(pools, probs, spec.batch_size, seed=_seed(recipe.seed, name),
                          own=blocks[name].blocks["expert"], own_rows=own_rows)
        cfg = TrainConfig(steps=steps, lr=spec.lr, warmup_steps=spec.warmup_steps, schedule="constant",
                          weight_decay=spec.weight_decay, betas=spec.betas, checkpoint_every=spec.checkpoint_every)
        checkpoint = out / f"checkpoint-{key}.pt"
        losses = train(model, sampler, cfg, checkpoint=checkpoint, desc=f"expert {name}", accelerator=accelerator)
        params = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters()}
        with atomic_path(out / MODEL_FILE) as tmp:
            save_file(params, str(tmp))
        manifest = {
            "key": key,
            "domain": name,
            "base_hash": base_hash,
            "data_hash": blocks[name].content_hash,
            "steps": steps,
            "tokens": steps * spec.batch_size * recipe.data.seq_len,
            "replay": spec.replay,
            "lr": spec.lr,
            "seed": recipe.seed,
            "loss_curve": [round(x, 5) for x in losses],
        }
        write_json(manifest_path, manifest)
        remove_checkpoint(checkpoint)
        log.info("expert %s: %d steps, loss %.3f → %.3f", name, steps, losses[0], losses[-1])
        experts.append(Expert(name, out, key, manifest))
        del model
    return experts
