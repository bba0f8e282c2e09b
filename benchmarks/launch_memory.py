"""Host memory per process of an expert job: one plain process against an FSDP launch of N processes.

    python benchmarks/launch_memory.py                                # SmolLM2-135M (recipes/smollm2.yaml), N = 2
    python benchmarks/launch_memory.py --recipe R --processes 4 experts.batch_size=8

Each run trains one expert (`mergemix experts RECIPE --domain D`, a few steps, in a run directory of its own)
from the recipe's base: once as one plain process, twice under `accelerate launch --num_processes N --use_fsdp
--fsdp_version 2`: as the recipe says, and with training and scoring both under bf16 autocast (what a GPU
node does by default), where the launch gathers the decoder layers in bf16 (`mergemix.collective.shard_model`)
instead of keeping autocast's bf16 copy of the whole model for backward. The single process's run does not
depend on the scoring precision. Every process reports its peak resident memory (getrusage ru_maxrss) and
its resident memory just after its imports (torch, transformers, mergemix: the same in every process), and
the table prints them beside the model's float32 size. One process holds the base whole and trains a copy of
it (weights, gradients, AdamW state: 4 + 16 bytes a parameter); under the FSDP launch no process ever holds
the base whole (mergemix.model.sharded): each reads its rows of the checkpoint, trains them in place (4/N +
12/N bytes a parameter, plus one decoder layer and the root's embedding gathered) and reads them back, and
the main process gathers the expert whole only to save it. Every run goes through `mergemix.cli.main`, which
pins glibc's mmap threshold (mergemix.hostmem).

Measured on 2 CPU cores, SmolLM2-135M (134.5M parameters, 0.50 GiB in float32), the recipe's batch of 8 rows
of 128 tokens, `experts.steps=2`, 2 processes: figures in docs/scale.md#fsdp.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

PORT = "29547"


def _rss_now() -> int:
    """Resident bytes of this process now (Linux /proc)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _child(out: Path, argv: list[str]) -> None:
    """Run `mergemix <argv>` here; write this process's memory to out/rank-R.json."""
    import torch  # noqa: F401  (imported before the baseline is read: every process holds them)
    import transformers  # noqa: F401

    from mergemix.cli import main

    start = _rss_now()
    code = main(argv)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "start": start, "peak": peak, "code": code}))


def _run(cmd: list[str], out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": PORT}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/smollm2.yaml")
    p.add_argument("--domain", help="the expert to train (default: the recipe's first domain)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="recipe overrides (default: a short job, see the module's doc)")
    args = p.parse_args()
    if args.child:
        _child(Path(args.child), args.overrides)
        return
    from mergemix.merge.check import file_specs
    from mergemix.recipe import load_recipe

    overrides = args.overrides or ["experts.steps=2"]

    domain = args.domain or load_recipe(args.recipe).domain_names[0]
    gb = 2**30
    # (label, processes, extra overrides): the launch twice, its layers gathered as they are (float32
    # scoring) and in bf16 (training and scoring both under bf16 autocast, a GPU node's default)
    runs = [("one process", 1, []), ("FSDP", args.processes, []),
            ("FSDP, bf16 layers", args.processes, ["experts.precision=bf16", "evaluation.precision=bf16"])]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, n, extra) in enumerate(runs):
            out = Path(tmp) / f"run{i}"
            out.mkdir()
            argv = ["experts", args.recipe, "--domain", domain, *overrides, *extra, f"run_dir={out / 'run'}"]
            me = [__file__, "--child", str(out), "--", *argv]
            if n == 1:
                cmd = [sys.executable, *me]
            else:
                cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", str(n),
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "--main_process_port", PORT, "--use_fsdp", "--fsdp_version", "2", *me]
            rows[label] = (n, _run(cmd, out))
            if n == 1:  # the expert's tensors are the base's
                specs = file_specs(out / "run" / "experts" / domain / "model.safetensors")
                params = sum(math.prod(shape) for shape, _ in specs.values())
    single = rows["one process"][1][0]
    print(f"{args.recipe}: expert {domain}, {' '.join(overrides)}; base {params:,} parameters, "
          f"{4 * params / gb:.2f} GiB in float32")
    print(f"{'run':>17} {'processes':>9} {'rank':>4} {'peak RSS GiB':>12} {'vs 1 process':>12} "
          f"{'above imports GiB':>17} {'vs 1 process':>12} {'above imports / fp32 model':>26}")
    for label, (n, ranks) in rows.items():
        for r in ranks:
            above = r["peak"] - r["start"]
            print(f"{label:>17} {n:>9} {r['rank']:>4} {r['peak'] / gb:>12.2f} {r['peak'] / single['peak']:>12.2f} "
                  f"{above / gb:>17.2f} {above / (single['peak'] - single['start']):>12.2f} "
                  f"{above / (4 * params):>26.2f}")

if __name__ == "__main__":
    main()
