"""Multiple-choice scoring: mergemix's own scorer against lm-eval-harness, same model, items and batch size.

Prints items per second of each (one warm-up run each, then --repeats timed runs taken in turns so that
all see the same load on a shared machine; medians), their ratio, and how often they agree item by item on
acc and acc_norm. mergemix scores in float32 and under bfloat16 autocast (evaluation.precision bf16; on CPUs
too); lm-eval runs the model as it is (float32). mergemix's per-item answers come from scoring one-item
subsets with the same public `score`; lm-eval's from its logged samples.

    python benchmarks/scoring_speed.py                  # a fresh demo-size Llama (0.8M), word_problems_mc
    python benchmarks/scoring_speed.py --base DIR       # a local HF checkpoint, e.g. a cached demo base
    python benchmarks/scoring_speed.py --data FILE      # any multiple-choice jsonl (question, choices, answer)
    python benchmarks/scoring_speed.py --base ~/.cache/mergemix/bases/gguf-SmolLM2-135M-Instruct.Q4_1-*   # 135M
    python benchmarks/scoring_speed.py --base DIR --device cuda   # on a GPU (benchmarks/gpu_check.sh)

Both share an item's question among its options: lm-eval's HFLM through its logits cache (one forward pass
per item where every option is one token), mergemix by running each question once and copying its
key/value cache to every option.

Needs lm-eval (pip install 'mergemix[lmeval]'). On 2 idle CPU cores the default run takes ~15 s; on a
loaded machine both scorers slow down many times over, so compare only figures from one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mergemix.data.readers import resolve_paths
from mergemix.evaluate import EvalContext, Evaluator
from mergemix.evaluate.kinds import MultipleChoice
from mergemix.evaluate.lmeval import write_mc_task
from mergemix.model.modeling import build_demo_model, load_base, train_tokenizer
from mergemix.recipe import BenchmarkSpec, DemoBaseSpec


def _timed(fns: list[Callable[[], Any]], repeats: int) -> list[tuple[Any, float]]:
    """(last result, median seconds) of each function: one untimed warm-up call each, then `repeats`
    rounds in which every function runs once, so a change of load on the machine hits them alike."""
    out = [fn() for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            out[i] = fn()
            times[i].append(time.perf_counter() - start)
    return [(o, statistics.median(t)) for o, t in zip(out, times, strict=True)]


def _model(base: str | None, texts: list[str]) -> tuple[torch.nn.Module, Any, str]:
    if base:
        model, tok = load_base(base)
        return model.eval(), tok, base
    spec = DemoBaseSpec()  # the demo's size: hidden 128, 2 layers, ffn 512, vocab 2048
    tok = train_tokenizer(texts, spec.vocab)
    model = build_demo_model(spec, len(tok), 128, tok.eos_token_id, seed=0).eval()
    return model, tok, "fresh demo-size Llama (untrained)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="local HF checkpoint directory (default: a fresh demo-size model)")
    p.add_argument("--data", default="builtin:word_problems_mc", help="multiple-choice jsonl or builtin:NAME")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass, both scorers")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each scorer (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--items", type=int, default=None, help="score at most this many items (the first ones)")
    p.add_argument("--device", default="cpu", help="where both scorers run the model (cuda: the GPU check)")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    from lm_eval import __version__ as lm_eval_version
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    work = Path(tempfile.mkdtemp(prefix="scoring-speed-"))
    files = resolve_paths(args.data, work)
    if len(files) != 1:
        raise SystemExit(f"--data {args.data}: expected one file, found {len(files)}")
    data = files[0]
    spec = BenchmarkSpec(name="mc", kind="multiple_choice", path=str(data))
    items = MultipleChoice.read(spec, work)[: args.items]
    data = work / "items.jsonl"  # the same items for lm-eval
    data.write_text("".join(json.dumps({"question": it.question, "choices": it.choices, "answer": it.answer}) + "\n"
                            for it in items))
    model, tok, what = _model(args.base, [f"{it.question} {' '.join(it.choices)}" for it in items])
    model.to(args.device)
    contexts = {"fp32": EvalContext(tok, 128, {}, work, args.batch_size, 0),
                "bf16": EvalContext(tok, 128, {}, work, args.batch_size, 0, torch.bfloat16)}
    scorers = {p: Evaluator([spec], ctx, {"mc": items}) for p, ctx in contexts.items()}
    write_mc_task(work / "tasks", "mc", data)
    task_dict = TaskManager(include_path=str(work / "tasks"), include_defaults=False).load(["mc"])
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)
    timed = _timed([
        lambda: scorers["fp32"](model)["mc"],
        lambda: scorers["bf16"](model)["mc"],
        lambda: evaluator.evaluate(lm=lm, task_dict=task_dict, log_samples=True, bootstrap_iters=0),
    ], args.repeats)
    (theirs, theirs_s) = timed[2]
    per_doc = {s["doc_id"]: s for s in theirs["samples"]["mc"]}
    theirs_result = theirs["results"]["mc"]

    n = len(items)
    print(f"model: {what}; {sum(x.numel() for x in model.parameters()):,} parameters; {n} items of {args.data} "
          f"(mean {sum(len(it.choices) for it in items) / n:.1f} choices); batch size {args.batch_size}; "
          f"{torch.get_num_threads()} threads, {args.device}")
    print("| scorer | seconds | items/s | acc | acc_norm |\n| --- | --- | --- | --- | --- |")
    for (result, s), precision in zip(timed[:2], ("fp32", "bf16"), strict=True):
        print(f"| mergemix multiple_choice, {precision} | {s:.2f} | {n / s:.1f} | {result['acc']:.4f} | "
              f"{result['acc_norm']:.4f} |")
    print(f"| lm-eval {lm_eval_version} (HFLM, in memory, fp32) | {theirs_s:.2f} | {n / theirs_s:.1f} | "
          f"{theirs_result['acc,none']:.4f} | {theirs_result['acc_norm,none']:.4f} |")
    for (_, s), precision in zip(timed[:2], ("fp32", "bf16"), strict=True):
        print(f"speed ratio, mergemix {precision} items/s / lm-eval items/s: {theirs_s / s:.2f}")
    for precision, ctx in contexts.items():
        ours_items = [Evaluator([spec], ctx, {"mc": [it]})(model)["mc"] for it in items]
        for metric in ("acc", "acc_norm"):
            agree = sum(ours_items[i][metric] == per_doc[i][metric] for i in range(n))
            print(f"agreement with lm-eval on {metric}, mergemix {precision}, item by item: {agree}/{n} = "
                  f"{agree / n:.4f}")


if __name__ == "__main__":
    main()
