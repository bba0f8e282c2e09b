"""Train (or reuse) one expert per domain from the shared base.

An expert's directory is a Hugging Face checkpoint that other tools open as it is (config.json, the
tokenizer, model*.safetensors in the base's dtype), or with `experts.lora` a peft adapter directory
(adapter_config.json, adapter_model.safetensors, the tokenizer), plus `manifest.json` ("kind": "full" or
"lora"; what it was trained from and how, plus its loss curve), written last: a directory without a
manifest is unfinished.
The manifest's `key` hashes every input: base, data, recipe fields, seed. An expert whose key matches is
reused; one whose training was killed resumes from its checkpoint.

Under a multi-process launch (accelerate launch, torchrun) every process trains its rows of each batch
and the main process alone writes the expert. Under an FSDP launch the base is sharded (no process holds it
whole): each expert trains the sharded base itself, which is read back from its files afterwards, and is
gathered on the main process only to be saved.

A domain of experts.checkpoints has its expert trained elsewhere: its directory is checked against the base
(`check_given`) and taken as it is (`given_expert`), nothing written into it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergemix.artifacts import Hasher, read_json, stable_hash, write_json
from mergemix.collective import is_main_process
from mergemix.data.prepare import DomainBlocks
from mergemix.errors import MergemixError
from mergemix.merge.check import Spec, check_expert_file, tensor_specs
from mergemix.merge.lazy import SafetensorsState
from mergemix.merge.lora import ADAPTER_CONFIG, ADAPTER_FILE, LoraExpert, check_adapter
from mergemix.model.sharded import gathered, is_sharded, trainable
from mergemix.model.train import (
    Sampler,
    TrainConfig,
    make_accelerator,
    remove_checkpoint,
    resolve_precision,
    train,
)
from mergemix.recipe import ExpertSpec, LoraSpec, Recipe

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # save_pretrained's map of a sharded checkpoint
MANIFEST = "manifest.json"
KIND = "full"  # a full-parameter expert saved as a Hugging Face checkpoint
LORA = "lora"  # a peft LoRA adapter of the base


@dataclass(frozen=True)
class Expert:
    domain: str
    path: Path
    key: str
    manifest: dict

    def state(self) -> SafetensorsState | LoraExpert:
        """Parameter name → tensor as saved (a tied output embedding is stored once, like the base's
        named_parameters give it), read from the memory-mapped shards as they are used; or, for a LoRA
        expert, its adapters' factors."""
        if self.manifest.get("kind") == LORA:
            return LoraExpert(self.path)
        cast = getattr(torch, self.manifest["dtype"]) if "given" in self.manifest else None
        return SafetensorsState(weight_files(self.path), cast=cast)


def given_expert(domain: str, path: Path, dtype: torch.dtype) -> Expert:
    """The expert of `domain` trained elsewhere (experts.checkpoints) at `path`: a full checkpoint, its
    tensors read as `dtype` (the base's) when saved in another, or a peft adapter. Its key is the files'
    fingerprint; how it was trained is unknown (tokens 0 in the report's accounting)."""
    kind = LORA if (path / ADAPTER_CONFIG).exists() else KIND
    h = Hasher().update("given")
    for f in sorted(path.iterdir()):  # its weights and configurations, by name, size and sampled bytes
        if f.suffix in (".safetensors", ".json") and f.name != MANIFEST:
            h.update(f.name).update_sampled(f)
    manifest = {"key": h.hexdigest(), "kind": kind, "domain": domain,
                "given": str(path), "tokens": 0, "dtype": str(dtype).removeprefix("torch.")}
    return Expert(domain, path, manifest["key"], manifest)


def check_given(checkpoints: dict[str, str], base: dict[str, Spec]) -> None:
    """Refuse, in one line naming the domain and the directory, an expert of experts.checkpoints that is
    missing or cannot be merged into the base (`base`: its tensors' specs): another architecture, other tensor
    names or shapes, an adapter of another base. Its dtype may differ from the base's."""
    for domain, raw in checkpoints.items():
        path = Path(raw)
        where = f"experts.checkpoints.{domain}: {path}"
        if not path.is_dir():
            raise MergemixError(f"{where}: no such directory; give the Hugging Face checkpoint or peft adapter "
                                "directory of the expert")
        if (path / ADAPTER_CONFIG).exists():
            problem = check_adapter(path, base)
        elif not all(f.exists() for f in weight_files(path)):
            problem = f"holds no {MODEL_FILE} (or {WEIGHTS_INDEX}); save it with save_pretrained"
        else:
            problem = check_expert_file(weight_files(path), base, dtypes=False)
        if problem is not None:
            raise MergemixError(f"{where}: {problem}; an expert must be trained from this base (same architecture, "
                                "tensor names and shapes)")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of the Hugging Face checkpoint in `path`: its shards, or its one file."""
    index = path / WEIGHTS_INDEX
    files = sorted(set(read_json(index)["weight_map"].values())) if index.exists() else [MODEL_FILE]
    return [path / f for f in files]


def expert_key(recipe: Recipe, base_hash: str, blocks: dict[str, DomainBlocks], domain: str) -> str:
    """Hash of everything an expert's weights depend on. Replay mixes all domains in, so their hashes count
    too. How the budget was written (steps or tokens) and checkpoint_every do not change the result."""
    spec = recipe.experts
    data = [blocks[domain].content_hash] + (
        [blocks[d].content_hash for d in sorted(blocks)] if spec.replay > 0 else []
    )
    # lora counts only when set, so full experts keep the keys they had before the field existed
    # experts trained elsewhere and their replay mix change no expert trained here
    training = spec.model_dump(mode="json", exclude={"steps", "tokens", "checkpoint_every", *spec.train_fields(),
                                                     "checkpoints", "replay_proportions",
                                                     *(["lora"] if spec.lora is None else [])})
    return stable_hash([base_hash, data, training, spec.num_steps(recipe.data.seq_len), recipe.data.seq_len,
                        _seed(recipe.seed, domain), domain, *precision_key(recipe)])


def device_kind(recipe: Recipe) -> str:
    """"cuda" or "cpu": the device kind the run's precisions resolve on (`resolve_precision`)."""
    return "cuda" if recipe.device == "auto" and torch.cuda.is_available() else "cpu"


def training_precision(recipe: Recipe) -> str:
    """What experts.precision means on the run's device (experts and report runs): fp32, bf16 or fp16."""
    return resolve_precision(recipe.experts.precision, device_kind(recipe))


def precision_key(recipe: Recipe) -> list[str]:
    """What the training precision adds to a cache key: nothing for float32 training of a float32 base (the
    keys of such runs predate the field), else the resolved precision. Micro-batches and gradient
    checkpointing change results only by float rounding and are left out."""
    precision = training_precision(recipe)
    return [] if precision == "fp32" and recipe.base.dtype == "float32" else [f"train-{precision}-master-fp32"]


def _seed(seed: int, domain: str) -> int:
    """Sampling seed of one expert: from its name, so adding or reordering domains leaves the others alone."""
    return int(stable_hash([seed, domain]), 16) % 2**31


def general_probs(blocks: dict[str, DomainBlocks], names: list[str]) -> tuple[float, ...]:
    """Token proportions of the domains: the 'general data' mix used for replay and as the prior."""
    total = sum(blocks[n].n_tokens for n in names)
    return tuple(blocks[n].n_tokens / total for n in names)


def replay_rows(spec: ExpertSpec) -> int:
    """Rows of every expert batch drawn from general data: `replay` of `batch_size`, rounded."""
    return round(spec.replay * spec.batch_size)


def replay_share(spec: ExpertSpec) -> float:
    """The share of general data the experts trained on: `replay` as the batches held it (whole rows)."""
    return replay_rows(spec) / spec.batch_size


def _finished(out: Path, key: str, name: str, base: dict[str, Spec], kind: str) -> dict | None:
    """The manifest of a finished expert of `kind` for `key` in `out`, or None if it must be trained. The key
    says the weights are current, but the files may have been replaced since: their tensors (names, shapes,
    dtypes, from the headers; a LoRA adapter's factors) are checked against the base's `specs`."""
    path = out / MANIFEST
    if not path.exists():
        return None
    manifest = read_json(path)
    if manifest.get("key") != key:
        return None
    if manifest.get("kind") != kind:
        log.info("expert %s: %s holds weights only (an older layout without config or tokenizer); training it "
                 "again", name, out)
        return None
    problem = check_adapter(out, base) if kind == LORA else check_expert_file(weight_files(out), base)
    if problem is not None:
        log.warning("expert %s: %s does not match the base: %s; training it again", name, out, problem)
        return None
    return manifest


def train_experts(
    recipe: Recipe,
    base: torch.nn.Module,
    base_hash: str,
    blocks: dict[str, DomainBlocks],
    run_dir: Path,
    tokenizer: object = None,
    domains: Sequence[str] | None = None,
    reuse_only: bool = False,
) -> list[Expert]:
    """One expert per domain (only those in `domains` if given), in recipe order; unchanged experts are
    reused, interrupted ones resumed. `tokenizer` is saved beside each expert's weights. With `reuse_only` a
    missing or outdated expert is an error (`mergemix search` trains nothing)."""
    spec = recipe.experts
    names = recipe.domain_names
    steps = spec.num_steps(recipe.data.seq_len)
    own_rows = spec.batch_size - replay_rows(spec)
    general = sorted(names)  # the replay mix, in an order that does not depend on the recipe's
    pools = tuple(blocks[n].blocks["expert"] for n in general)
    probs = general_probs(blocks, general)
    accelerator = make_accelerator(recipe.device)
    main = is_main_process()
    base_specs = tensor_specs(dict(base.named_parameters()))
    dtype = next(base.parameters()).dtype
    if spec.lora is not None and is_sharded(base):
        raise MergemixError("experts.lora: LoRA experts train data-parallel, each process holding the frozen base "
                            "(accelerate launch --multi_gpu, torchrun), not under an FSDP launch; launch without "
                            "--use_fsdp, or drop experts.lora")
    experts = []
    for name in [n for n in names if domains is None or n in domains]:
        if name in spec.checkpoints:
            experts.append(given_expert(name, Path(spec.checkpoints[name]), dtype))
            log.info("expert %s: trained elsewhere, %s", name, spec.checkpoints[name])
            continue
        out = run_dir / "experts" / name
        key = expert_key(recipe, base_hash, blocks, name)
        manifest = _finished(out, key, name, base_specs, LORA if spec.lora else KIND)
        accelerator.wait_for_everyone()  # every process has decided before the main one changes anything
        if manifest is not None:
            log.info("expert %s: reusing %s", name, out)
            experts.append(Expert(name, out, key, manifest))
            continue
        if reuse_only:
            raise MergemixError(f"expert {name}: no current expert for this recipe in {out}; run mergemix propose "
                                "RECIPE first (this command trains no expert)")
        if main:
            out.mkdir(parents=True, exist_ok=True)
            (out / MANIFEST).unlink(missing_ok=True)  # weights and manifest must never disagree after a kill
        sampler = Sampler(pools, probs, spec.batch_size, seed=_seed(recipe.seed, name),
                          own=blocks[name].blocks["expert"], own_rows=own_rows)
        checkpoint = out / f"checkpoint-{key}.safetensors"
        with trainable(base) as model:  # under FSDP: the sharded base itself, read back from its files after
            if spec.lora is not None:
                model = with_adapters(model, spec.lora, _seed(recipe.seed, name))
            losses = train(model, sampler, TrainConfig.constant(spec, steps), checkpoint=checkpoint,
                           desc=f"expert {name}", accelerator=accelerator)
            whole = gathered(model, dtype)  # itself, or under FSDP its shards gathered on the main process
        manifest = {
            "key": key,
            "kind": LORA if spec.lora else KIND,
            "domain": name,
            "base_hash": base_hash,
            "data_hash": blocks[name].content_hash,
            "steps": steps,
            "tokens": steps * spec.tokens_per_step(recipe.data.seq_len),
            "replay": spec.replay,
            "lr": spec.lr,
            "seed": recipe.seed,
            "dtype": str(dtype).removeprefix("torch."),
            "loss_curve": [round(x, 5) for x in losses],
            **({"lora": spec.lora.model_dump(mode="json")} if spec.lora else {}),
        }
        if main:
            save_expert(whole, tokenizer, out, manifest)
            remove_checkpoint(checkpoint)
            log.info("expert %s: %d steps, loss %.3f → %.3f, saved to %s", name, steps, losses[0], losses[-1], out)
        accelerator.wait_for_everyone()  # the expert is on disk before any process reads it
        experts.append(Expert(name, out, key, manifest))
        del model, whole
    return experts


def with_adapters(model: torch.nn.Module, spec: LoraSpec, seed: int) -> torch.nn.Module:
    """`model` wrapped by peft with fresh LoRA adapters (its own weights frozen), initialised from `seed` so
    an expert trained again gets the same weights."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=spec.target_modules, task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, config)
        except ValueError as e:
            raise MergemixError(f"experts.lora.target_modules: {e}") from None


def save_expert(model: torch.nn.Module, tokenizer: object, out: Path, manifest: dict) -> None:
    """`model` (in its own dtype; a peft model saves its adapters) and `tokenizer` as a Hugging Face
    directory, then `manifest` last: a kill before the manifest leaves an expert that is trained again, never
    one that is half written. The other kind's weight files, from an earlier run, are removed first."""
    for stale in [*out.glob("model*.safetensors"), out / WEIGHTS_INDEX, out / ADAPTER_CONFIG, out / ADAPTER_FILE]:
        stale.unlink(missing_ok=True)
    model.save_pretrained(out)  # type: ignore[attr-defined]
    if tokenizer is not None:
        tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    write_json(out / MANIFEST, manifest)
