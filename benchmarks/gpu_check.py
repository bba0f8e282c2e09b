"""The GPU check of the scale-out issue: expert training in bf16 and the merge on one CUDA device.

    python benchmarks/gpu_check.py                      # both checks on a SmolLM2-135M-shaped model, cuda
    python benchmarks/gpu_check.py --device cpu --small # a dry run of the same code on a 2-layer model

`benchmarks/gpu_check.sh` runs it with the scorer's check (`benchmarks/scoring_speed.py --device cuda`) as
one script for the device machine. The model has SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads of
which 3 key/value, ffn 1536, vocabulary 49152, tied embeddings: 134.5M parameters) and random weights: the
packaged checkpoint is over the 64 MiB a device call carries, and speeds do not depend on the weights. It is
saved with a tokenizer trained on the standard library's documentation (`--save DIR`), so the scorer's check
can load it as a checkpoint.

- train: mergemix's own training loop (`mergemix.model.train.train`, AdamW, float32 master weights) for
  `--steps` steps of 16 rows x 512 tokens, in float32 and under bf16 autocast, timed after one warm-up step:
  tokens/s of each, their ratio, and the peak memory allocated on the device.
- merge: an in-place linear merge of K = 4 experts (`InPlaceMerger.apply`, task vectors resident in
  float32) into the model on the device, against a plain device copy of the same bytes: a merge reads the K
  task vectors and the base and writes the parameters, (K + 2) x 4 bytes per parameter, so bytes/s of the
  merge ÷ bytes/s of the copy says how close the merge runs to the card's bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

K = 4
ROWS, SEQ = 16, 512


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall seconds of `fn` over `repeats` calls after one warm-up call, the device synchronized."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_model(small: bool, save: Path | None) -> torch.nn.Module:
    """A Llama of SmolLM2-135M's shape (or a 2-layer one, `small`) with random weights, in float32 on the CPU;
    saved with a tokenizer as a checkpoint directory at `save`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergemix.catalog import BUILTINS
    from mergemix.model.modeling import train_tokenizer

    layers, hidden, ffn, heads, kv, vocab = (2, 128, 512, 4, 2, 2048) if small else (30, 576, 1536, 9, 3, 49152)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                         rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    if save is not None:
        texts = [r["text"] for r in BUILTINS.get("prose")()]  # the standard library's documentation
        tokenizer = train_tokenizer(texts, config.vocab_size)
        model.config.eos_token_id = model.config.bos_token_id = tokenizer.eos_token_id
        model.save_pretrained(save)
        tokenizer.save_pretrained(save)
    return model


def _train_seconds(model: torch.nn.Module, device: torch.device, precision: str, steps: int,
                   accelerator: object) -> float:
    """Wall seconds of `steps` steps of mergemix's training loop on random tokens, after one warm-up step
    (kernels chosen, memory allocated); the model trains in place."""
    from mergemix.model.train import TrainConfig, train

    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def sampler(step: int) -> torch.Tensor:
        return torch.randint(0, vocab, (ROWS, SEQ), generator=generator)

    def run(n: int) -> None:
        cfg = TrainConfig(steps=n, lr=1e-4, warmup_steps=0, checkpoint_every=10**9, precision=precision)
        train(model, sampler, cfg, desc=f"train {precision}", accelerator=accelerator)

    run(1)
    _sync(device)
    start = time.perf_counter()
    run(steps)
    _sync(device)
    return time.perf_counter() - start


def check_train(model: torch.nn.Module, device: torch.device, steps: int) -> dict[str, float]:
    """Tokens/s of mergemix's training loop in float32 and under bf16 autocast, and the peak device memory."""
    from mergemix.model.train import make_accelerator

    accelerator = make_accelerator("cpu" if device.type == "cpu" else "auto")
    model.to(device)
    out: dict[str, float] = {}
    for precision in ("fp32", "bf16"):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = _train_seconds(model, device, precision, steps, accelerator)
        out[f"{precision} tokens/s"] = steps * ROWS * SEQ / seconds
        peak = ""
        if device.type == "cuda":
            out[f"{precision} peak GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
            peak = f", peak {out[f'{precision} peak GiB']:.2f} GiB allocated"
        print(f"train {precision}: {steps} steps of {ROWS} x {SEQ} tokens in {seconds:.2f} s, "
              f"{out[f'{precision} tokens/s']:,.0f} tokens/s{peak}", flush=True)
    out["bf16 / fp32 speed"] = out["bf16 tokens/s"] / out["fp32 tokens/s"]
    print(f"train: bf16 autocast runs {out['bf16 / fp32 speed']:.2f}x float32's tokens/s", flush=True)
    model.to("cpu")
    return out


def check_merge(model: torch.nn.Module, device: torch.device, repeats: int) -> dict[str, float]:
    """Bytes/s of an in-place linear merge of K experts against a device copy of the same bytes."""
    from mergemix.merge import InPlaceMerger

    model = model.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    base = {n: p.detach() for n, p in model.named_parameters()}
    experts = {f"e{k}": {n: t + 1e-3 * torch.randn(t.shape, generator=generator, device=device, dtype=t.dtype)
                         for n, t in base.items()} for k in range(K)}
    merger = InPlaceMerger(model, experts, "linear")
    del experts
    alpha = [1.0 / K] * K
    numel = sum(t.numel() for t in base.values())
    merge_s = _seconds(lambda: merger.apply(alpha), device, repeats)
    merged_bytes = (K + 2) * 4 * numel  # read K task vectors and the base, write the parameters
    src = torch.empty(merged_bytes // 8, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_s = _seconds(lambda: dst.copy_(src), device, repeats)  # reads and writes merged_bytes in all
    merger.close()
    model.to("cpu")
    out = {"parameters": float(numel), "merge ms": merge_s * 1e3, "merge GB/s": merged_bytes / merge_s / 1e9,
           "copy GB/s": merged_bytes / copy_s / 1e9}
    out["merge / copy bandwidth"] = out["merge GB/s"] / out["copy GB/s"]
    print(f"merge: {numel:,} parameters, K = {K}, linear, resident float32: {out['merge ms']:.2f} ms, "
          f"{out['merge GB/s']:.0f} GB/s; a device copy of the same bytes: {out['copy GB/s']:.0f} GB/s; "
          f"ratio {out['merge / copy bandwidth']:.2f}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["train", "merge"], help="run one check (default: both)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="a 2-layer model (a dry run on CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per precision")
    p.add_argument("--repeats", type=int, default=20, help="timed merges and copies (medians)")
    p.add_argument("--save", type=Path, help="save the model and a tokenizer here (for scoring_speed.py)")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    model = build_model(args.small, args.save)
    figures: dict[str, dict[str, float]] = {}
    for check in [args.only] if args.only else ["train", "merge"]:
        try:
            figures[check] = (check_train(model, device, args.steps) if check == "train"
                              else check_merge(model, device, args.repeats))
        except Exception as e:  # report and go on: one short device call runs every check
            print(f"{check}: FAILED: {type(e).__name__}: {e}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
