"""Training memory and speed of mergemix's training loop: fp32 full batch, bf16 mixed precision with
gradient accumulation, and the same with gradient checkpointing, on one small Hugging Face model.

    python benchmarks/train_memory.py                        # Llama, hidden 256, 4 layers (4.7M), CPU
    python benchmarks/train_memory.py --hidden 512 --layers 8 --seq-len 512 --batch 16 --micro 4

Each setting trains in its own subprocess (`mergemix.model.train.train`, the loop experts use; AdamW) so that
one's peak does not hide another's. What is measured, per setting:

- peak bytes per parameter: on CPU, the process's peak resident memory after training (getrusage
  ru_maxrss) minus its resident memory just before (imports, data and the float32 model: /proc VmRSS),
  plus the model's own float32 bytes; on a GPU, torch.cuda.max_memory_allocated. Divided by the
  parameter count. So it is weights + gradients + AdamW state + activations +
  autocast copies, per parameter: 16 (4 weights, 4 grads, 8 Adam) plus activations.
- tokens/s: tokens trained per second over the timed steps (after one untimed warm-up step).

All settings see the same global batch; the accumulation settings split it into `--micro` micro-batches.
On a shared CPU, compare only figures from one run. Measured on 2 shared, loaded CPU cores (~10 min):

    setting                              peak bytes/param  vs fp32   tokens/s  vs fp32
    fp32, full batch                                348.6     1.00        585     1.00
    bf16 mixed + accumulation                        65.2     0.19        155     0.26
    bf16 mixed + accum + checkpointing               50.1     0.14        122     0.21

Most of the fp32 figure is activations of the whole 32 x 256 batch; accumulation over micro-batches of 4
cuts them 8-fold. CPU bf16 autocast is slow without bf16 matrix units: on CPU it saves memory, not time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SETTINGS = {
    "fp32, full batch": {"precision": "fp32"},
    "bf16 mixed + accumulation": {"precision": "bf16", "micro": True},
    "bf16 mixed + accum + checkpointing": {"precision": "bf16", "micro": True, "gradient_checkpointing": True},
}


def _rss_now() -> int:
    """Resident bytes of this process now (Linux /proc)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _child(args: argparse.Namespace, setting: dict) -> dict:
    """Train in this process; return parameters, bytes per parameter and tokens/s."""
    import torch

    from mergemix.model.modeling import build_demo_model, param_count
    from mergemix.model.train import Sampler, TrainConfig, make_accelerator, train
    from mergemix.recipe import DemoBaseSpec

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = DemoBaseSpec(hidden=args.hidden, layers=args.layers, heads=args.hidden // 64, ffn=4 * args.hidden,
                        vocab=args.vocab)
    model = build_demo_model(spec, args.vocab, args.seq_len, 0, seed=0)
    n = param_count(model)
    pool = torch.randint(0, args.vocab, (256, args.seq_len), generator=torch.Generator().manual_seed(0))
    sampler = Sampler((pool,), (1.0,), batch_size=args.batch, seed=0)
    cfg = dict(lr=1e-4, warmup_steps=0, precision=setting["precision"],
               micro_batch_size=args.micro if setting.get("micro") else None,
               gradient_checkpointing=setting.get("gradient_checkpointing", False))
    accelerator = make_accelerator("auto")
    model.to(accelerator.device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = _rss_now()
    train(model, sampler, TrainConfig(steps=1, **cfg), accelerator=accelerator)  # warm-up
    start = time.perf_counter()
    train(model, sampler, TrainConfig(steps=args.steps, **cfg), accelerator=accelerator)
    seconds = time.perf_counter() - start
    # training's peak above what was resident before it, plus the float32 weights that already were
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss() - before + 4 * n
    return {"params": n, "bytes_per_param": peak / n, "tokens_per_s": args.steps * args.batch * args.seq_len / seconds,
            "device": device}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=32, help="global batch (sequences per step)")
    p.add_argument("--micro", type=int, default=4, help="micro-batch of the accumulation settings")
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(args, SETTINGS[args.child])))
        return
    rows = []
    for name in SETTINGS:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", name]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append((name, json.loads(out.strip().splitlines()[-1])))
    first = rows[0][1]
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: {first['params']:,} "
          f"parameters; global batch {args.batch} x {args.seq_len} tokens, micro-batch {args.micro}; "
          f"device {first['device']}")
    print(f"{'setting':<36} {'peak bytes/param':>16} {'vs fp32':>8} {'tokens/s':>10} {'vs fp32':>8}")
    for name, r in rows:
        print(f"{name:<36} {r['bytes_per_param']:>16.1f} {r['bytes_per_param'] / first['bytes_per_param']:>8.2f} "
              f"{r['tokens_per_s']:>10.0f} {r['tokens_per_s'] / first['tokens_per_s']:>8.2f}")


if __name__ == "__main__":
    main()
