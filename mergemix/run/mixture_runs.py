"""The report's ground truth: which mixtures to train for real, and one real model per mixture and seed.

A mixture run trains a copy of the base on the domains' expert pools (the text the experts saw and the
base did not), sampled in proportion to α, with the experts' optimizer (report.lr and report.warmup_steps
replace its schedule). Runs with the same seed number
draw from the same random stream whatever their mixture (common random numbers): differences between
mixtures are then less noisy, and the noise ceiling is measured under the same design. Its scores are saved under
`report/runs/<key>.json`, where the key hashes every input (base, data, α, seed, budget, benchmarks), so
a rerun reuses every finished run, and a killed one resumes from its checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergemix.artifacts import read_json, stable_hash, write_json
from mergemix.collective import is_main_process
from mergemix.data.prepare import DomainBlocks
from mergemix.errors import MergemixError
from mergemix.feasible import Bounds
from mergemix.model.sharded import gathered, trainable
from mergemix.model.train import Sampler, TrainConfig, make_accelerator, remove_checkpoint, train
from mergemix.recipe import Recipe
from mergemix.run.experts import precision_key
from mergemix.search.trials import alpha_key, as_alpha

log = logging.getLogger(__name__)

SPREAD_POOL = 4000  # Dirichlet(1) draws the spread points are picked from


@dataclass(frozen=True)
class Mixture:
    label: str  # proposal, uniform, token_prior, include-N or spread-N
    alpha: dict[str, float]


def report_bounds(recipe: Recipe, available: dict[str, int]) -> Bounds:
    """The recipe's mixture bounds at the mixture runs' budget (report.steps x batch x seq_len tokens): the
    repetition caps a run of that length is held to."""
    run_tokens = recipe.report.run_tokens(recipe.experts, recipe.data.seq_len)
    return recipe.mixture.model_copy(update={"total_tokens": run_tokens}).bounds(recipe.domain_names, available)


def choose_mixtures(recipe: Recipe, prior: Sequence[float], star: dict[str, float],
                    available: dict[str, int]) -> list[Mixture]:
    """The proposal, uniform, token-proportional and the user's mixtures, then spread points: each next one
    is the Dirichlet(1) draw farthest from every mixture already chosen. The proposal is left out of the
    spread, so that a new proposal does not move (and retrain) the others.

    With report.space feasible the draws are moved into the mixture bounds at the runs' budget
    (`report_bounds`), and an `include` outside them is an error: every mixture but the baselines is one a
    run of this recipe could propose. Where the feasible set holds fewer distinct points than
    report.mixtures, a warning says so and the report trains those there are."""
    names = recipe.domain_names
    k = len(names)
    bounds = report_bounds(recipe, available) if recipe.report.space == "feasible" else None
    fixed = [("proposal", [star[d] for d in names]), ("uniform", [1 / k] * k), ("token_prior", list(prior))]
    for i, mix in enumerate(recipe.report.include):
        vec = [mix.get(d, 0.0) for d in names]
        broken = bounds.outside(as_alpha(names, vec)) if bounds is not None else {}
        if broken:
            raise MergemixError(f"report.include[{i}]: {as_alpha(names, vec)} breaks the mixture bounds at the "
                                f"runs' budget ({'; '.join(f'{d} {w}' for d, w in broken.items())}); change it, or "
                                "set report.space: simplex")
        fixed.append((f"include-{i}", vec))
    chosen: list[Mixture] = []
    for label, vec in fixed:
        mix = Mixture(label, as_alpha(names, vec))
        twin = next((m for m in chosen if alpha_key(m.alpha) == alpha_key(mix.alpha)), None)
        if twin is None:
            chosen.append(mix)
        else:
            log.info("mixture %s equals %s; trained once", label, twin.label)
    pool = np.random.default_rng([recipe.seed, 4]).dirichlet(np.ones(k), size=SPREAD_POOL)
    if bounds is not None and not bounds.unconstrained:
        pool = np.unique(np.round(bounds.project(pool), 6), axis=0)
    points = np.array([[m.alpha[d] for d in names] for m in chosen if m.label != "proposal"])
    dist = np.min(np.linalg.norm(pool[:, None, :] - points[None], axis=-1), axis=1)
    while len(chosen) < recipe.report.mixtures:
        i = int(np.argmax(dist))
        if dist[i] < 1e-6:
            log.warning("report: the feasible set holds only %d distinct mixtures, not report.mixtures = %d; "
                        "training those", len(chosen), recipe.report.mixtures)
            break
        chosen.append(Mixture(f"spread-{len(chosen)}", as_alpha(names, pool[i])))
        dist = np.minimum(dist, np.linalg.norm(pool - pool[i], axis=1))
    return chosen


def run_key(recipe: Recipe, base_hash: str, blocks: dict[str, DomainBlocks], alpha: dict[str, float],
            seed_index: int, bench_key: str) -> str:
    """Hash of everything a mixture run's scores depend on."""
    e = recipe.experts
    training = [e.batch_size, *recipe.report.schedule(e), e.weight_decay, list(e.betas),
                recipe.report.num_steps(e, recipe.data.seq_len), recipe.data.seq_len]
    data = [blocks[d].content_hash for d in recipe.domain_names]
    return stable_hash([base_hash, data, alpha_key(alpha), recipe.seed, seed_index, training, bench_key,
                        *precision_key(recipe)])


def mixture_run(
    recipe: Recipe,
    base: torch.nn.Module,
    blocks: dict[str, DomainBlocks],
    mixture: Mixture,
    seed_index: int,
    key: str,
    out_dir: Path,
    evaluate: Callable[[torch.nn.Module], dict[str, dict[str, float]]] | None,
) -> dict[str, Any] | None:
    """Train (or reuse) one real model on `mixture` with seed number `seed_index`; return its record:
    raw scores, tokens trained, final training loss.

    Under a multi-process launch every process trains its rows of each batch (data-parallel or FSDP); the
    main process alone scores the model (with `evaluate`, which the others need not have) and writes the
    record; the others return None."""
    path = out_dir / f"{key}.json"
    checkpoint = out_dir / f"{key}.checkpoint.safetensors"
    accelerator = make_accelerator(recipe.device)
    main = is_main_process()
    done = path.exists()
    accelerator.wait_for_everyone()  # every process has looked before the main one writes
    if done:
        if main:
            remove_checkpoint(checkpoint)  # left by a kill between saving the result and cleaning up
        return read_json(path) if main else None
    names = recipe.domain_names
    e = recipe.experts
    steps = recipe.report.num_steps(e, recipe.data.seq_len)
    seed = int(stable_hash([recipe.seed, "mixture", seed_index]), 16) % 2**31
    torch.manual_seed(seed)  # dropout, for bases that have it
    sampler = Sampler(tuple(blocks[d].blocks["expert"] for d in names), tuple(mixture.alpha[d] for d in names),
                      e.batch_size, seed=seed)
    cfg = TrainConfig.constant(e, steps, *recipe.report.schedule(e))
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    with trainable(base) as model:  # under FSDP: the sharded base itself, read back from its files after
        losses = train(model, sampler, cfg, checkpoint=checkpoint, desc=f"{mixture.label} seed {seed_index}",
                       accelerator=accelerator)
        whole = gathered(model, next(base.parameters()).dtype)  # under FSDP, on the main process alone
    record = None
    if main:
        assert evaluate is not None and whole is not None
        record = {
            "key": key,
            "label": mixture.label,
            "alpha": mixture.alpha,
            "seed_index": seed_index,
            "steps": steps,
            "tokens": steps * e.tokens_per_step(recipe.data.seq_len),
            "final_loss": round(float(np.mean(losses[-10:])), 5),
            "raw": evaluate(whole.to(accelerator.device)),
        }
        write_json(path, record)
        remove_checkpoint(checkpoint)
    accelerator.wait_for_everyone()  # the record is on disk before any process looks for it
    del model, whole
    return record
