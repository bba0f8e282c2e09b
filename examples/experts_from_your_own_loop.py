"""Experts trained by your own training loop (here a plain transformers + torch loop), fed to mergemix.

    python examples/experts_from_your_own_loop.py recipes/demo.yaml --steps 150 --out runs/my-experts

Each domain's expert starts from the recipe's base and is saved with `save_pretrained`; mergemix then
searches the mixture over them (experts.checkpoints): it checks them against the base and trains nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from mergemix import MixtureRun, load_recipe


def train_expert(base: torch.nn.Module, blocks: torch.Tensor, steps: int, batch_size: int, lr: float,
                 seed: int) -> torch.nn.Module:
    """A constant-learning-rate AdamW run on random blocks of one domain: any loop of yours goes here."""
    model = copy.deepcopy(base).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides, as on the mergemix command line")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", required=True, help="where the experts are saved, one directory per domain")
    args = p.parse_args()

    recipe = load_recipe(args.recipe, args.overrides)
    ws = MixtureRun(recipe).workspace  # the base and each domain's packed training blocks
    given = {}
    for i, domain in enumerate(recipe.domain_names):
        expert = train_expert(ws.model, ws.blocks[domain].blocks["expert"], args.steps, recipe.experts.batch_size,
                              recipe.experts.lr, seed=i)
        expert.save_pretrained(Path(args.out) / domain)
        ws.tokenizer.save_pretrained(Path(args.out) / domain)
        given[domain] = str(Path(args.out) / domain)
    # the experts saw their own domain only: no replay to map
    run = MixtureRun(load_recipe(args.recipe, [*args.overrides, f"experts.checkpoints={json.dumps(given)}",
                                               "experts.replay=0"]))
    proposal = run.propose()
    print(proposal.table())


if __name__ == "__main__":
    main()
