"""How fast and how lean is a merge? One run prints, side by side:

- merge time ÷ a plain copy of the model's bytes (1 thread, both timed in turn in the same rounds as CPU time;
  goal ≤ 1.5 × (K + 2) / 2, the bandwidth floor of reading K task vectors and the base and writing the result),
  and ÷ that floor measured: one torch.sum over K + 1 stacked rows, the fewest passes any kernel needs (it reads
  the same K + 1 tensors and writes one, and costs more than (K + 2) / 2 copies: a copy streams two arrays, the
  floor K + 2, which the memory system serves less well);
- peak memory the merger adds, in bytes per parameter, for resident fp32, resident bf16, streamed and LoRA
  (r = 16 on every linear layer, merged from the factors) merges (each in a fresh process; anonymous memory sampled every millisecond, so memory-mapped expert files that
  the kernel can drop do not count), and for resident fp32 in each of 2 processes (torch.distributed.run,
  gloo) merging their halves of the model sharded with FSDP2, as a launch's search does;
- one mergemix trial (a merge written into the resident model) ÷ mergekit writing the same merge to disk.

    .venv/bin/python benchmarks/merge_speed.py            # ~2 minutes on 2 CPU cores, ~1 GB of temp files

Sizes: a 22M-parameter Llama (hidden 512, 4 layers) and K = 4 experts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

K = 4
LORA_R = 16
# mode: (model dtype, stream, LoRA experts)
MODES = {"resident fp32": ("float32", False, False), "resident bf16": ("bfloat16", False, False),
         "streamed fp32": ("float32", True, False), f"LoRA r={LORA_R} fp32": ("float32", False, True)}


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=8000, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype)


def _write_checkpoints(root: Path) -> None:
    """The base and K experts (base + noise) as Hugging Face directories, as mergekit reads them."""
    model = _model()
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    for k in range(K):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n] + 0.01 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / f"e{k}")


def _write_adapters(root: Path) -> None:
    """K peft LoRA adapters of rank LORA_R on every linear layer of the base, with random factors."""
    from peft import LoraConfig, get_peft_model

    for k in range(K):
        torch.manual_seed(10 + k)
        config = LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(_model(), config).save_pretrained(root / f"l{k}")


def _timed(fns: dict[str, Callable[[], object]], rounds: int = 12) -> dict[str, float]:
    """Seconds of this thread's CPU time per call, the least over `rounds` rounds that call each function in
    turn: on a shared machine, wall time and other processes' load would swamp the ratios."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()  # warm up
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.thread_time()
            fn()
            best[name] = min(best[name], time.thread_time() - start)
    return best


class _AnonPeak:
    """Peak anonymous resident memory (bytes) of this process, sampled every millisecond."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def __enter__(self) -> _AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def _merger(root: Path, mode: str):  # noqa: ANN202 (an InPlaceMerger, imported late)
    from mergemix.merge import InPlaceMerger
    from mergemix.merge.lazy import SafetensorsState, checkpoint_state
    from mergemix.merge.lora import LoraExpert
    from mergemix.recipe import MergeSpec

    dtype, stream, lora = MODES[mode]
    model = _model(getattr(torch, dtype))
    experts = {f"e{k}": SafetensorsState(root / f"e{k}" / "model.safetensors") for k in range(K)}
    if lora:
        experts = {f"l{k}": LoraExpert(root / f"l{k}") for k in range(K)}
    if dtype != "float32":  # experts of the model's dtype, as a bf16 run trains them
        experts = {name: {t: v.to(getattr(torch, dtype)) for t, v in s.items()} for name, s in experts.items()}
    base_files = checkpoint_state(root / "base") if stream else None  # Θ_base read from its file, not copied
    return lambda: InPlaceMerger(model, experts, MergeSpec(stream=stream, memory_mb=64), base_files=base_files), model


def _lora_share(model: torch.nn.Module) -> float:
    """Bytes per model parameter of K float32 LoRA factor pairs, K · r · (d_in + d_out) · 4 over every linear
    layer but the head: what LoRA experts add instead of K task vectors."""
    linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    return 4 * K * LORA_R * sum(m.in_features + m.out_features for m in linear) / sum(
        p.numel() for p in model.parameters())


def child(root: Path, mode: str) -> None:
    """In a fresh process: the merger's added peak memory per parameter (building it, then one merge)."""
    make, model = _merger(root, mode)
    n = sum(p.numel() for p in model.parameters())
    before = _AnonPeak.now()
    with _AnonPeak() as peak:
        make().apply([0.1, 0.2, 0.3, 0.4])
    print(json.dumps({"bytes_per_param": (peak.peak - before) / n}))


def shard_child(root: Path) -> None:
    """One of 2 processes (torch.distributed.run, gloo): the peak memory its merger adds when the model is
    sharded with FSDP2 (mergemix.collective.shard_model), per parameter of the whole model."""
    from mergemix.collective import shard_model

    torch.distributed.init_process_group("gloo")
    make, model = _merger(root, "resident fp32")
    n = sum(p.numel() for p in model.parameters())
    shard_model(model)
    before = _AnonPeak.now()
    with _AnonPeak() as peak:
        make().apply([0.1, 0.2, 0.3, 0.4])
    print(json.dumps({"bytes_per_param": (peak.peak - before) / n}), flush=True)
    torch.distributed.destroy_process_group()


def main() -> None:
    from mergemix.merge import InPlaceMerger
    from mergemix.merge.lazy import SafetensorsState

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_checkpoints(root)
        _write_adapters(root)
        torch.set_num_threads(1)
        model = _model()
        n = sum(p.numel() for p in model.parameters())
        src, dst, rows = torch.randn(n), torch.empty(n), torch.randn(K + 1, n)
        experts = {f"e{k}": SafetensorsState(root / f"e{k}" / "model.safetensors") for k in range(K)}
        merger = InPlaceMerger(model, experts)
        alpha = [0.1, 0.2, 0.3, 0.4]
        times = _timed({"copy": lambda: dst.copy_(src), "merge": lambda: merger.apply(alpha),
                        "one pass": lambda rows=rows: torch.sum(rows, dim=0, out=dst)})
        copy, merge, one_pass = times["copy"], times["merge"], times["one pass"]
        del rows
        floor = (K + 2) / 2
        print(f"model: {n / 1e6:.1f}M parameters, K = {K} experts, 1 thread; times: least CPU time of 12 rounds")
        print(f"plain copy of {n * 4 / 2**20:.0f} MiB: {copy * 1e3:.1f} ms; resident fp32 merge: {merge * 1e3:.1f} ms")
        print(f"merge ÷ copy: {merge / copy:.2f}   (bandwidth floor (K+2)/2 = {floor:.1f}; goal ≤ {1.5 * floor:.1f})")
        print(f"measured floor (one pass reading K+1 tensors, writing one): {one_pass * 1e3:.1f} ms = "
              f"{one_pass / copy:.2f} copies; merge ÷ measured floor: {merge / one_pass:.2f}   (goal ≤ 1.5)")
        print()
        print(f"{'mode':<16}{'merger peak B/param':>21}{'merge ms':>10}{'÷ copy':>8}")
        for mode in MODES:
            # memory in a fresh process, with a fixed mmap threshold: freed large buffers go back to the system
            # instead of raising glibc's threshold and staying in the heap, counted in the peak ever after
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(root)], check=True,
                                 capture_output=True, text=True, env=env).stdout
            per_param = json.loads(out.strip().splitlines()[-1])["bytes_per_param"]
            make, _ = _merger(root, mode)
            m = make()
            seconds = _timed({"copy": lambda: dst.copy_(src), "merge": lambda m=m: m.apply(alpha)}, rounds=5)
            seconds = seconds["merge"] * copy / seconds["copy"]  # this round's ratio, in the first copy's time
            del m
            print(f"{mode:<16}{per_param:>21.1f}{seconds * 1e3:>10.1f}{seconds / copy:>8.2f}")
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", "29651", __file__, "--shard-child", str(root)], check=True,
                             capture_output=True, text=True, env=env).stdout
        shares = [json.loads(line)["bytes_per_param"] for line in out.splitlines() if line.startswith("{")]
        print(f"{'sharded fp32 /2':<16}{max(shares):>21.1f}{'-':>10}{'-':>8}   (the larger of 2 processes' peaks)")
        print("(the old merger kept a float32 base and K float32 task vectors: 4 (K + 1) = "
              f"{4 * (K + 1)} B/param at K = {K}; LoRA factors: {_lora_share(model):.2f} B/param at K = {K})")
        print()
        try:
            from mergekit.config import MergeConfiguration
            from mergekit.merge import MergeOptions, run_merge
        except ImportError:
            print("mergekit not installed (pip install 'mergemix[test]'): no comparison")
            return
        config = MergeConfiguration.model_validate({
            "merge_method": "task_arithmetic", "base_model": str(root / "base"), "dtype": "float32",
            "models": [{"model": str(root / f"e{k}"), "parameters": {"weight": a}} for k, a in enumerate(alpha)],
        })
        start = time.process_time()  # CPU time of all its threads, as the merge's above
        run_merge(config, str(root / "mk"), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
        mergekit = time.process_time() - start
        print(f"mergemix trial (merge in place): {merge * 1e3:.1f} ms; mergekit merge to disk: {mergekit * 1e3:.0f} ms"
              f" CPU; ratio {merge / mergekit:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2, metavar=("MODE", "ROOT"))
    parser.add_argument("--shard-child", metavar="ROOT")
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[1]), args.child[0])
    elif args.shard_child:
        shard_child(Path(args.shard_child))
    else:
        main()
