"""Real multi-process launches on CPU (accelerate launch, gloo): data-parallel and FSDP2-sharded experts,
the collective sharded search, and the report's mixture runs trained data-parallel."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import micro_recipe_dict

pytestmark = pytest.mark.slow

PORT = "29533"
EXPERTS = ["-m", "mergemix", "experts"]
# accelerate's --cpu launches one process unless mpirun is set up; --multi_gpu (and --use_fsdp) start
# torch.distributed.run, which on a machine without CUDA (or with device: cpu in the recipe) trains on CPU
LAUNCH = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", PORT]
FSDP = ["--use_fsdp", "--fsdp_version", "2"]
LAUNCHERS = {"ddp": ["--multi_gpu"], "fsdp": FSDP}


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": PORT}


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def recipe_file(micro_data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One micro recipe for the module, so every launch reuses the demo base and packed data it cached."""
    root = tmp_path_factory.mktemp("distributed")
    path = root / "micro.yaml"
    path.write_text(yaml.safe_dump(micro_recipe_dict(micro_data, root / "run", root / "cache")))
    return path


@pytest.fixture(scope="module")
def one_process(recipe_file: Path) -> Path:
    """The math expert trained by one plain process, whole batches at once."""
    run = recipe_file.parent / "one"
    _run([sys.executable, *EXPERTS, str(recipe_file), f"run_dir={run}", "--domain", "math"])
    return run / "experts" / "math"


def _same_expert(expert: Path, reference: Path) -> None:
    """Same files as the reference expert, and weights equal to float rounding."""
    assert sorted(p.name for p in expert.iterdir()) == sorted(p.name for p in reference.iterdir())
    a = load_file(str(reference / "model.safetensors"))
    b = load_file(str(expert / "model.safetensors"))
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-5, msg=n)


def test_two_process_expert_equals_one_process(recipe_file: Path, one_process: Path) -> None:
    """The same global batch split over 2 data-parallel processes (each accumulating 2 micro-batches) gives
    the 1-process expert's weights to float rounding, and only the main process writes the expert."""
    run = recipe_file.parent / "ddp"
    log = _run([*LAUNCH, "--multi_gpu", *EXPERTS, str(recipe_file), f"run_dir={run}",
                "experts.micro_batch_size=2", "--domain", "math"])
    assert log.count("stage experts ...") == 2  # two processes ran the stage
    assert log.count("expert math: 6 steps") == 1  # logged by the process that saves, after saving
    _same_expert(run / "experts" / "math", one_process)


def test_fsdp_expert_equals_one_process(recipe_file: Path, one_process: Path) -> None:
    """An FSDP2 full-shard launch (each process holds half of every weight, gradient and AdamW state;
    2 micro-batches each) gives the 1-process expert to float rounding: the shards are gathered to the main
    process, which alone writes the expert."""
    run = recipe_file.parent / "fsdp"
    log = _run([*LAUNCH, *FSDP, *EXPERTS, str(recipe_file), f"run_dir={run}",
                "experts.micro_batch_size=2", "--domain", "math"])
    assert log.count("stage experts ...") == 2
    assert log.count("expert math: 6 steps") == 1
    _same_expert(run / "experts" / "math", one_process)
    assert not list((run / "experts" / "math").glob("checkpoint-*"))  # its sharded checkpoint (step 3) is gone


def test_a_bf16_fsdp_launch_gathers_the_layers_in_bf16(recipe_file: Path) -> None:
    """Where training and scoring both run under bf16 autocast, an FSDP launch gathers the decoder layers in
    bf16 (so no process keeps autocast's bf16 copy of the whole model for backward), and the expert is the
    one-process bf16 expert but for bf16 rounding: its update from the base agrees to a few percent. Where
    scoring is float32 (the recipe's default here) the layers are gathered as they are."""
    bf16 = ["experts.precision=bf16", "evaluation.precision=bf16"]
    one, two = recipe_file.parent / "bf16_one", recipe_file.parent / "bf16_fsdp"
    _run([sys.executable, *EXPERTS, str(recipe_file), f"run_dir={one}", *bf16, "--domain", "math"])
    log = _run([*LAUNCH, *FSDP, *EXPERTS, str(recipe_file), f"run_dir={two}", *bf16, "--domain", "math"])
    assert log.count("layers gathered in torch.bfloat16") == 2
    fp32 = _run([*LAUNCH, *FSDP, *EXPERTS, str(recipe_file), f"run_dir={two}_scored_fp32",
                 "experts.precision=bf16", "--domain", "math"])
    assert "sharded over 2 processes" in fp32 and "layers gathered" not in fp32
    base = load_file(str(next((recipe_file.parent / "cache").rglob("model.safetensors"))))
    a = load_file(str(one / "experts" / "math" / "model.safetensors"))
    b = load_file(str(two / "experts" / "math" / "model.safetensors"))
    assert a.keys() == b.keys()
    tau_a = torch.cat([(a[n] - base[n]).flatten() for n in sorted(a)])
    tau_b = torch.cat([(b[n] - base[n]).flatten() for n in sorted(a)])
    assert tau_a.norm() > 0
    assert (tau_b - tau_a).norm() / tau_a.norm() < 0.05


def test_a_bf16_fsdp_launch_searches_with_the_gradient_strategy(recipe_file: Path) -> None:
    """Under bf16 training and scoring an FSDP launch's sharded base has its layers gathered in bf16, and the
    whole proposal runs on it: three experts trained in place one after the other (the accelerator reused
    across them keeps FSDP), the sharded gradient search under the scoring's autocast, the guard. Each step's
    estimate and gradient, and α*, are a one-process bf16 run's but for bf16 rounding."""
    bf16 = ["experts.precision=bf16", "evaluation.precision=bf16", "search.strategy=gradient",
            "search.gradient_steps=6", "search.gradient_batch=3", "search.gradient_verify=2"]
    one, two = recipe_file.parent / "bf16_propose_one", recipe_file.parent / "bf16_propose_fsdp"
    cmd = ["-m", "mergemix", "-v", "propose", str(recipe_file), *bf16]
    one_log = _run([sys.executable, *cmd, f"run_dir={one}"])
    log = _run([*LAUNCH, *FSDP, *cmd, f"run_dir={two}", "search.launch=sharded"])
    assert log.count("layers gathered in torch.bfloat16") == 2
    steps_one, steps_two = _descent(one_log), _descent(log)
    assert len(steps_one) == len(steps_two) == 6
    # the launch's descent runs under the scoring's bf16 autocast, the one process's in float32: ~1e-3 apart
    for (v1, g1), (v2, g2) in zip(steps_one, steps_two, strict=True):
        assert v2 == pytest.approx(v1, abs=1e-2)
        np.testing.assert_allclose(g2, g1, rtol=0.05, atol=5e-3)
    star_one = json.loads((one / "proposal.json").read_text())["alpha_star"]
    star_two = json.loads((two / "proposal.json").read_text())["alpha_star"]
    assert star_two == pytest.approx(star_one, abs=0.05)


def test_a_killed_fsdp_expert_resumes_from_its_sharded_checkpoint(recipe_file: Path) -> None:
    """An FSDP2 expert job killed (SIGKILL, every process) after a sharded checkpoint continues from it when run
    again, and ends with the weights of an uninterrupted FSDP run: model, AdamW state and schedule were saved by
    both processes (torch.distributed.checkpoint) and loaded back into their shards."""
    budget = ["experts.steps=60", "experts.checkpoint_every=5"]
    fsdp = [*LAUNCH, *FSDP, *EXPERTS, str(recipe_file), "--domain", "math", *budget]
    whole, killed = recipe_file.parent / "fsdp_whole", recipe_file.parent / "fsdp_killed"
    _run([*fsdp, f"run_dir={whole}"])
    out = killed / "experts" / "math"
    proc = subprocess.Popen([*fsdp, f"run_dir={killed}"], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (saved := list(out.glob("checkpoint-*.sharded/step-*/done.json"))):
        assert proc.poll() is None, "the launch ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    launch = psutil.Process(proc.pid)
    for p in [*launch.children(recursive=True), launch]:  # the workers run in sessions of their own
        p.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()  # killed before it finished
    step = saved[0].parent
    assert {p.name for p in step.iterdir()} >= {"rng-0.safetensors", "rng-1.safetensors", "done.json"}
    assert len(list(step.glob("*.distcp"))) == 2  # each process wrote its part
    log = _run([*fsdp, f"run_dir={killed}"])
    resumed = [int(s) for s in re.findall(r"resuming at step (\d+) of 60", log)]
    assert len(resumed) == 2 and resumed[0] == resumed[1] >= 5  # both processes, from the same step
    _same_expert(out, whole / "experts" / "math")
    assert not list(out.glob("checkpoint-*"))


def _trials(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("launcher", "launch"), [("ddp", "sharded"), ("ddp", "data_parallel"),
                                                  ("fsdp", "sharded"), ("fsdp", "data_parallel")])
def test_two_process_propose_searches_together_like_one_process(recipe_file: Path, launcher: str,
                                                                launch: str) -> None:
    """`propose` under a 2-process launch searches together, the base and task vectors sharded over both
    processes or whole in each: the main process alone writes trials and proposal, the other merges and
    evaluates every α in step with it, each scoring half the items, and the trials and α* equal a one-process
    propose's. A data-parallel launch holds the base whole and shards it for a sharded search; an FSDP launch
    holds it sharded (each process read its rows) and reads it whole for a data-parallel search. The experts
    are trained once, by the one-process run (data-parallel training is equal only to float rounding), and
    reused by the launch."""
    one, two = recipe_file.parent / "propose_one", recipe_file.parent / f"propose_{launcher}_{launch}"
    cmd = ["-m", "mergemix", "propose", str(recipe_file)]
    if not one.exists():
        _run([sys.executable, *cmd, f"run_dir={one}"])
    shutil.copytree(one, two, ignore=shutil.ignore_patterns("trials.jsonl", "search.json", "proposal.json",
                                                                  "timings.json"))
    log = _run([*LAUNCH, *LAUNCHERS[launcher], *cmd, f"run_dir={two}", f"search.launch={launch}"])
    assert log.count(f"search under a launch of 2 processes: {launch}") == 2
    assert ("reading the whole base again" in log) == (launcher == "ddp" and launch == "sharded")
    assert ("reading the sharded base again" in log) == (launcher == "fsdp" and launch == "data_parallel")
    if launcher == "fsdp":  # no process read the base whole: each read its rows, half of every parameter
        held = [(int(a.replace(",", "")), int(b.replace(",", "")))
                for a, b in re.findall(r"sharded over 2 processes, this one read ([\d,]+) of its ([\d,]+)", log)]
        assert len(held) == (2 if launch == "sharded" else 4)  # read again after a data-parallel search
        assert all(abs(mine - total / 2) < 0.01 * total for mine, total in held)
    assert log.count("stage search ...") == 1  # the main process runs the search, the other follows it
    assert log.count("wrote ") == 1  # the main process alone reports
    want, got = _trials(one), _trials(two)
    followed = [int(line.rsplit(" ", 2)[-2]) for line in log.splitlines() if "followed the main process's" in line]
    # the other process made every merge and evaluation with the main one: each trial's and the guard's three
    # (the proposal, uniform and token-proportional scored again item by item)
    assert followed == [len(want) + 3]
    assert [t["alpha"] for t in got] == [t["alpha"] for t in want]  # one writer: no trial twice
    for a, b in zip(want, got, strict=True):
        assert b["objective"] == pytest.approx(a["objective"], abs=1e-5), a["alpha"]
    # each process scored its half of every benchmark's items (the other half gathered from the other)
    shares: dict[str, list[tuple[int, int]]] = {}
    for name, mine, total in re.findall(r"benchmark (\S+): this process scores (\d+) of (\d+) items", log):
        shares.setdefault(name, []).append((int(mine), int(total)))
    assert sorted(shares) == ["math_heldout", "sums", "target"]
    for name, (a, b) in shares.items():
        assert a[1] == b[1] and a[0] + b[0] == a[1] and abs(a[0] - b[0]) <= 1, name
    star_one = json.loads((one / "proposal.json").read_text())["alpha_star"]
    star_two = json.loads((two / "proposal.json").read_text())["alpha_star"]
    assert star_two == pytest.approx(star_one, abs=1e-9)


def _descent(log: str) -> list[tuple[float, np.ndarray]]:
    """The gradient strategy's steps in a debug log: (estimate, its gradient in the logits) each."""
    return [(float(v), np.array(json.loads(g)))
            for v, g in re.findall(r"gradient: estimate (\S+), gradient in the logits (\[[^\]]*\])", log)]


@pytest.mark.parametrize(("launcher", "launch", "batch"), [("ddp", "data_parallel", 3), ("ddp", "sharded", 3),
                                                           ("fsdp", "sharded", 1)])
def test_the_gradient_strategy_runs_under_a_launch(recipe_file: Path, launcher: str, launch: str,
                                                   batch: int) -> None:
    """`search.strategy gradient` under a 2-process launch: each process differentiates on its half of every
    drawn batch and the gradients of α are summed, so the descent, its verified points and α* are a
    one-process gradient search's to float tolerance. Data-parallel, each process differentiates through its
    whole merged model; sharded, through its rows of it (the model merged in place, back-propagated as FSDP2
    trains, the parameters' gradients contracted with the merge's derivative in α). With one item drawn per
    benchmark the second process has none, and still runs its forward and backward passes in step."""
    one = recipe_file.parent / f"gradient_one_{batch}"
    two = recipe_file.parent / f"gradient_{launcher}_{launch}"
    cmd = ["-m", "mergemix", "-v", "propose", str(recipe_file), "search.strategy=gradient",
           "search.gradient_steps=6", f"search.gradient_batch={batch}", "search.gradient_verify=2"]
    if not one.exists():
        (one.parent / f"{one.name}.log").write_text(_run([sys.executable, *cmd, f"run_dir={one}"]))
    one_log = (one.parent / f"{one.name}.log").read_text()
    shutil.copytree(one, two, ignore=shutil.ignore_patterns("trials.jsonl", "search.json", "proposal.json",
                                                                  "timings.json"))
    log = _run([*LAUNCH, *LAUNCHERS[launcher], *cmd, f"run_dir={two}", f"search.launch={launch}"])
    assert log.count(f"search under a launch of 2 processes: {launch}") == 2
    assert log.count("gradient: 6 steps from") == 1  # the main process's descent, the other in step with it
    # the estimate and its gradient at each step (Adam would hide a gradient off by a constant factor)
    steps_one, steps_two = _descent(one_log), _descent(log)
    assert len(steps_one) == len(steps_two) == 6
    for (v1, g1), (v2, g2) in zip(steps_one, steps_two, strict=True):
        assert v2 == pytest.approx(v1, abs=1e-4)
        np.testing.assert_allclose(g2, g1, rtol=1e-3, atol=1e-4)
    want, got = _trials(one), _trials(two)
    assert [t["kind"] for t in got] == [t["kind"] for t in want]
    for a, b in zip(want, got, strict=True):
        assert b["alpha"] == pytest.approx(a["alpha"], abs=2e-3), (a["kind"], a["alpha"], b["alpha"])
    star_one = json.loads((one / "proposal.json").read_text())["alpha_star"]
    star_two = json.loads((two / "proposal.json").read_text())["alpha_star"]
    assert star_two == pytest.approx(star_one, abs=2e-3)


@pytest.mark.parametrize("launcher", ["ddp", "fsdp"])
def test_two_process_report_trains_mixture_runs_like_one_process(recipe_file: Path, launcher: str) -> None:
    """`report` under a 2-process launch merges and scores the proxies with both processes (each merging its
    shard) and trains each mixture run data-parallel or FSDP-sharded (the sharded base itself, trained in place
    and read back from its files after each run, gathered on the main process to be scored; a base not read
    back would make every later run differ): the main process alone scores and writes each run's record,
    and proxies and records equal those of a one-process report. The proposal (experts, trials) is made once
    by the one-process report and reused by the launch."""
    one, two = recipe_file.parent / "report_one", recipe_file.parent / f"report_{launcher}"
    report = ["report.mixtures=4", "report.seeds=1", "report.steps=4", "report.bootstrap=100",
              "report.interference_batches=0"]
    cmd = ["-m", "mergemix", "report", str(recipe_file), *report]
    if not one.exists():
        _run([sys.executable, *cmd, f"run_dir={one}"])
    shutil.copytree(one, two, ignore=shutil.ignore_patterns("runs", "index.html", "proxies.jsonl"))
    log = _run([*LAUNCH, *LAUNCHERS[launcher], *cmd, f"run_dir={two}"])
    proxies = [json.loads(line) for line in (one / "report" / "proxies.jsonl").read_text().splitlines()]
    assert proxies  # mixtures the search did not score
    followed = [int(line.rsplit(" ", 2)[-2]) for line in log.splitlines() if "followed the main process's" in line]
    assert followed == [len(proxies) + 3]  # the proxies and the guard's three (the trials are reused)
    again = [json.loads(line) for line in (two / "report" / "proxies.jsonl").read_text().splitlines()]
    assert [p["alpha"] for p in again] == [p["alpha"] for p in proxies]
    for a, b in zip(proxies, again, strict=True):
        for bench, scores in a["raw"].items():
            for metric, value in scores.items():
                assert b["raw"][bench][metric] == pytest.approx(value, abs=1e-6), (a["label"], bench, metric)
    assert log.count("mixture runs: 0 of 4 already done") == 2  # both processes train every mixture run
    assert log.count("wrote ") == 1  # the main process alone reports
    assert (two / "report" / "index.html").exists()
    runs = {p.name: json.loads(p.read_text()) for p in (one / "report" / "runs").glob("*.json")}
    assert len(runs) == 4
    assert sorted(p.name for p in (two / "report" / "runs").iterdir()) == sorted(runs)  # no checkpoint left
    for name, a in runs.items():
        b = json.loads((two / "report" / "runs" / name).read_text())
        assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-4)
        for bench, scores in a["raw"].items():
            for metric, value in scores.items():
                assert b["raw"][bench][metric] == pytest.approx(value, rel=1e-4, abs=1e-5), (name, bench, metric)


def test_fsdp_version_1_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """An FSDP launch without --fsdp_version 2 (accelerate's default is version 1) is refused before
    accelerate builds anything (on CPU it would raise a RuntimeError about missing devices)."""
    from mergemix.errors import MergemixError
    from mergemix.model.train import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    with pytest.raises(MergemixError, match="FSDP version 1 is not supported; use FSDP version 2"):
        make_accelerator("cpu")


def test_verify_real_is_refused_under_a_launch(micro_data: dict[str, Any], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """search.verify_real trains inside the main process's search, which the other processes cannot join:
    propose and report under a launch refuse it in one line before anything is read or trained."""
    from mergemix.errors import MergemixError
    from mergemix.pipelines.propose import propose
    from mergemix.recipe import recipe_from_dict
    from mergemix.report import rank_consistency

    d = micro_recipe_dict(micro_data, tmp_path / "run", tmp_path / "cache")
    recipe = recipe_from_dict({**d, "search": {**d["search"], "verify_real": 2}})
    monkeypatch.setenv("WORLD_SIZE", "2")
    for command in (propose, rank_consistency):
        with pytest.raises(MergemixError, match="search.verify_real: .* a launch of 2 processes cannot do yet"):
            command(recipe)
    assert not (tmp_path / "run").exists()
