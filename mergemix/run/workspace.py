"""A run's workspace: its directories, its base model and tokenizer, its packed domains and benchmark data.

`open_workspace` builds it whole, reusing what the cache holds (a converted GGUF base, the demo base, the
packed blocks): data → base → packed blocks. Every pipeline (propose, search, experts, evaluate, report)
starts from one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mergemix.artifacts import ensure_dir, stable_hash, write_text
from mergemix.collective import fsdp_launch, is_main_process, processes
from mergemix.data.prepare import DomainBlocks, load_domain, pack_domain
from mergemix.errors import MergemixError
from mergemix.evaluate import read_benchmarks
from mergemix.merge.check import tensor_specs
from mergemix.merge.lazy import checkpoint_state
from mergemix.model.bases import BaseSource, resolve_base
from mergemix.model.modeling import (
    DTYPES,
    build_demo_base,
    check_checkpoint_dir,
    fingerprint,
    load_base,
    load_tokenizer,
    max_positions,
)
from mergemix.model.sharded import load_sharded
from mergemix.model.train import AUTOCAST, process_state, resolve_precision
from mergemix.progress import progress
from mergemix.recipe import Recipe, dump_recipe
from mergemix.run.experts import (
    Expert,
    check_given,
    device_kind,
    precision_key,
    replay_share,
    training_precision,
)
from mergemix.search.mixture import available_tokens, check_cap

log = logging.getLogger(__name__)


@dataclass
class Timings:
    """Wall-clock seconds per stage, written to timings.json (kept out of proposal.json, which must be
    identical for identical inputs)."""

    stages: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("stage %s ...", name)
        start = time.perf_counter()
        yield
        self.stages[name] = round(time.perf_counter() - start, 2)
        log.info("stage %s done in %.1f s", name, self.stages[name])


@dataclass
class Workspace:
    """What every pipeline of a run starts from, complete when `open_workspace` returns it. The model is the
    base (on the run's device; under an FSDP launch sharded over the processes, `mergemix.model.sharded`); a
    merger changes it in place and restores it, and `reload_model` replaces it after a launch's search held it
    sharded or whole, the other way."""

    recipe: Recipe
    run_dir: Path
    cache_dir: Path
    timings: Timings
    base_path: Path  # the base's checkpoint directory (a GGUF file's conversion, the demo base's build)
    base_source: BaseSource  # what base.path named
    base_hash: str  # what the base's weights are: the experts' and mixture runs' keys start from it
    model: torch.nn.Module
    tokenizer: Any
    blocks: dict[str, DomainBlocks]
    available: dict[str, int]  # tokens the team has per domain (mixture bounds)
    benchmark_data: dict[str, Any]  # what read_benchmarks read

    def reload_model(self, whole: bool = False) -> None:
        """Read the base again, as `open_workspace` did (sharded under an FSDP launch), or `whole` (for the
        main process alone, or a data-parallel search): after a search that merged into it or sharded it."""
        del self.model
        self.model, _ = _load_base(self.base_path, self.recipe, whole)


@contextmanager
def main_process_first(device: str) -> Iterator[None]:
    """Run the body on the main process first, then on the others (which then find its caches written)."""
    if processes() == 1:
        yield
        return
    with process_state(device).main_process_first():
        yield


def _load_base(base_path: Path, recipe: Recipe, whole: bool = False) -> tuple[torch.nn.Module, Any]:
    """The base model, on the run's device, and its tokenizer. Under an FSDP launch (unless `whole`) it is
    sharded over the processes, each reading only its rows from the checkpoint's files: 8 processes hold one
    copy between them, not 8 (a collective: every process calls it)."""
    if fsdp_launch() and not whole:
        spec = recipe.base
        model = load_sharded(base_path, partial(checkpoint_state, base_path), DTYPES[spec.dtype],
                             process_state(recipe.device).device, spec.trust_remote_code, layer_dtype(recipe))
        return model, load_tokenizer(base_path, spec)
    model, tokenizer = load_base(base_path, recipe.base)
    if recipe.device == "auto" and torch.cuda.is_available():
        model.to("cuda")
    return model, tokenizer


def open_workspace(recipe: Recipe, distributed: bool = False) -> Workspace:
    """Set up the run directory, then read and split the domains, get the base (a local or packaged
    checkpoint, or the demo base, built once) and pack every domain. Commands that cannot run under a
    multi-process launch yet leave `distributed` False and are refused in one line."""
    n = processes()
    if n > 1 and not distributed:
        raise MergemixError(f"this command runs as one process, got {n} (accelerate launch, torchrun); "
                            "only propose, experts and report run multi-process: start it with python -m mergemix")
    precision_key(recipe)  # a precision this device cannot train or score in fails here, before any training
    scoring_precision(recipe)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    run_dir = ensure_dir(recipe.resolved_run_dir(), "run_dir")
    cache_dir = ensure_dir(recipe.resolved_cache_dir(), "cache_dir")
    if is_main_process():
        write_text(run_dir / "recipe.resolved.yaml", dump_recipe(recipe))
    timings, r = Timings(), recipe
    base_path, source, files = None, BaseSource(path=None, format="demo"), None
    if r.base.path:  # before minutes of reading data; a GGUF file is converted once, by the main process
        with main_process_first(r.device):
            base_path, source = resolve_base(r.base.path, cache_dir)
        check_checkpoint_dir(base_path)
        files = checkpoint_state(base_path) if r.experts.checkpoints else None
        if files is not None:
            check_given(r.experts.checkpoints, files.specs)  # experts trained elsewhere, before any data
    with timings.stage("data"), main_process_first(r.device):
        benchmark_data = read_benchmarks(r.evaluation.benchmarks, cache_dir)  # small files: fail fast
        docs = {d.name: load_domain(d, r.data.split, r.seed, cache_dir)
                for d in progress(r.data.domains, desc="read domains", leave=False)}
    with timings.stage("base"):
        if base_path is None:
            pools = {n: d.pools["base"] for n, d in docs.items()}
            base_path = build_demo_base(r.base.demo, pools, r.data.seq_len, r.seed, cache_dir, r.device)
        model, tokenizer = _load_base(base_path, r)
        if files is None:  # the demo base, or a checkpoint without safetensors files: checked once loaded
            check_given(r.experts.checkpoints, tensor_specs(dict(model.named_parameters())))
        limit = max_positions(model)
        if limit is not None and r.data.seq_len > limit:
            raise MergemixError(f"data.seq_len: {r.data.seq_len} is longer than the base's context of {limit} "
                                "tokens; lower data.seq_len")
        base_hash = stable_hash([fingerprint(base_path), r.base.dtype])
    with timings.stage("pack"), main_process_first(r.device):
        blocks = {n: pack_domain(d, tokenizer, r.data.seq_len, cache_dir) for n, d in docs.items()}
    available = available_tokens(r.data.domains, {n: b.n_tokens for n, b in blocks.items()})
    # The first moment every domain's token count is known: refuse an impossible cap before any expert.
    check_cap(r.mixture, available)
    return Workspace(recipe, run_dir, cache_dir, timings, base_path, source, base_hash, model, tokenizer, blocks,
                     available, benchmark_data)


def layer_dtype(recipe: Recipe) -> torch.dtype | None:
    """The dtype an FSDP launch gathers the sharded base's decoder layers in (`shard_model`): the autocast
    dtype where training (experts, report runs) and scoring both run under it (bf16 on a GPU by default),
    else None (float32 scoring must see float32 weights)."""
    train = training_precision(recipe)
    return AUTOCAST.get(train) if train == scoring_precision(recipe) else None


def scoring_precision(recipe: Recipe) -> str:
    """What evaluation.precision means on the run's device: fp32, bf16 or fp16."""
    return resolve_precision(recipe.evaluation.precision, device_kind(recipe), "evaluation.precision")


def benchmark_key(ws: Workspace) -> str:
    """What a model's raw scores depend on besides the model: each benchmark's data and scoring fields, and the
    scoring precision (when not fp32, so earlier keys stay). Objective weights, capability groups, metric
    choice and ceiling are left out: they are recomputed from the raw scores, so re-weighting an objective
    re-uses every evaluation already made."""
    benches = [
        [b.model_dump(mode="json", exclude={"metric", "capability", "ceiling", "allow_test_split"}),
         stable_hash(ws.benchmark_data[b.name])]
        for b in ws.recipe.evaluation.benchmarks
    ]
    precision = scoring_precision(ws.recipe)
    return stable_hash([ws.recipe.data.seq_len, benches, *([f"scored-{precision}"] if precision != "fp32" else [])])


def evaluation_key(ws: Workspace, experts: Sequence[Expert], budget: float | None = None) -> str:
    """What raw trial scores depend on: the experts, the merge method, the benchmarks and, with replay, that
    an α is a mixture (its merge weights mapped by the replay matrix; before, α was the merge weights); with
    search.repetition discount, the budget its epochs are counted at (default mixture.total_tokens) and R*."""
    r = ws.recipe
    spec = r.experts
    share = replay_share(spec)
    given = [["replay proportions", spec.replay_proportions]] if share > 0 and spec.replay_proportions else []
    repetition = []
    if r.search.repetition == "discount":
        repetition = [["repetition", budget or r.mixture.total_tokens, ws.available, r.search.repetition_r_star]]
    return stable_hash([[e.key for e in experts], r.merge.key(), benchmark_key(ws),
                        *([["replay weights", share]] if share > 0 else []), *given, *repetition])
