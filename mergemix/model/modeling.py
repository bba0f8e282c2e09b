"""Loading the shared base: any local Hugging Face causal LM, or the demo's tiny base built here.

The demo base is written as an ordinary HF checkpoint directory in the cache, keyed by its spec and the
hash of its training data, so from then on both kinds of base take the same path through the code.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from mergemix.artifacts import Hasher, atomic_path, stable_hash
from mergemix.collective import is_main_process
from mergemix.errors import MergemixError
from mergemix.recipe import BaseSpec, DemoBaseSpec

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def quiet_transformers() -> None:
    """transformers as mergemix runs it: offline (no hub calls), tokenizers without fork warnings, and its
    own logging at errors only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    from mergemix.progress import library_bars

    hf_logging.set_verbosity_error()
    if not library_bars():
        hf_logging.disable_progress_bar()


def check_checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise MergemixError(
            f"base.path: {path} is not a Hugging Face model directory (no config.json); give a local "
            "checkpoint directory, or leave base.path empty to build the demo base"
        )
    return path


def load_base(path: str | Path, spec: BaseSpec | None = None) -> tuple[torch.nn.Module, object]:
    """(model in eval mode, tokenizer) from a local checkpoint directory. Never downloads."""
    from transformers import AutoModelForCausalLM

    spec = spec or BaseSpec()
    tok = load_tokenizer(path, spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[spec.dtype], trust_remote_code=spec.trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise MergemixError(f"base.path: cannot load {path}: {e}") from None
    model.eval()
    return model, tok


def load_tokenizer(path: str | Path, spec: BaseSpec) -> Any:
    """The tokenizer of a local checkpoint directory, with the EOS token that separates packed documents and
    a pad token. Never downloads."""
    quiet_transformers()
    from transformers import AutoTokenizer

    path = check_checkpoint_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code, local_files_only=True)
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise MergemixError(f"base.path: cannot load {path}: {e}") from None
    if tok.eos_token_id is None:  # documents are packed with EOS between them
        sep = tok.sep_token or tok.bos_token
        if sep is None:
            raise MergemixError(f"base.path: the tokenizer in {path} has no eos, sep or bos token to separate "
                                "documents; set eos_token in its tokenizer_config.json")
        tok.eos_token = sep
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def max_positions(model: torch.nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def cache_of(output: Any) -> Any | None:
    """The key/value cache a forward pass returned: `cache` in transformers 5, `past_key_values` before."""
    for name in ("cache", "past_key_values"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    return None


def cache_kwarg(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword argument that hands `cache` back to `model`'s forward, by the name its version takes (no
    deprecated argument, no warning)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def fingerprint(path: str | Path) -> str:
    """Identity of a checkpoint directory without reading all of it: its config, and every weight file's
    name, size and sampled bytes (`Hasher.update_sampled`; a safetensors header alone would not tell two
    same-shape checkpoints apart)."""
    path = Path(path)
    h = Hasher().update((path / "config.json").read_text(encoding="utf-8"))
    for f in sorted(path.iterdir()):
        if f.suffix in WEIGHT_SUFFIXES:
            h.update_sampled(f)
    return h.hexdigest()


def demo_base_dir(spec: DemoBaseSpec, data_hash: str, seq_len: int, seed: int, cache_dir: Path) -> Path:
    key = stable_hash([spec.model_dump(), data_hash, seq_len, seed])
    return Path(cache_dir) / "bases" / f"demo-{key}"


def train_tokenizer(texts: list[str], vocab: int):  # -> PreTrainedTokenizerFast
    """A byte-level BPE tokenizer trained on `texts` (about 3 bytes per token at vocab 2048)."""
    quiet_transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def build_demo_model(spec: DemoBaseSpec, vocab_size: int, seq_len: int, eos_id: int, seed: int) -> torch.nn.Module:
    """A freshly initialised Llama-style model with tied embeddings."""
    quiet_transformers()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=max(seq_len, 512),
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_checkpoint_dir(model: torch.nn.Module, tokenizer: object, path: Path, extra: dict | None = None) -> None:
    """Save model + tokenizer as an HF directory, atomically (a temp directory renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.unlink()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
        if extra:
            (tmp / "mergemix.json").write_text(json.dumps(extra, indent=2, sort_keys=True))


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_demo_base(
    spec: DemoBaseSpec,
    base_texts: dict[str, list[str]],
    seq_len: int,
    seed: int,
    cache_dir: Path,
    device: str = "auto",
) -> Path:
    """Train the demo tokenizer and pre-train the tiny base on the domains' base pools (all domains in
    token proportion, cosine schedule); cached, so a second run reuses it. Returns its directory."""
    from mergemix.data.prepare import pack_texts
    from mergemix.model.sharded import gathered
    from mergemix.model.train import Sampler, TrainConfig, make_accelerator, remove_checkpoint, train

    h = Hasher()
    for name in sorted(base_texts):
        h.update(name)
        for t in base_texts[name]:
            h.update(t)
    path = demo_base_dir(spec, h.hexdigest(), seq_len, seed, cache_dir)
    if (path / "config.json").exists():
        log.info("demo base: reusing %s", path)
        return path
    log.info("demo base: training a %d-token BPE tokenizer", spec.vocab)
    tokenizer = train_tokenizer([t for name in sorted(base_texts) for t in base_texts[name]], spec.vocab)
    pools = []
    for name in sorted(base_texts):
        blocks, _ = pack_texts(base_texts[name], tokenizer, seq_len, desc=f"{name}/base")
        if len(blocks) == 0:
            raise MergemixError(f"domain {name!r}: its base pool is too small to pre-train the demo base on")
        pools.append(blocks)
    model = build_demo_model(spec, len(tokenizer), seq_len, tokenizer.eos_token_id, seed)
    log.info("demo base: pre-training %s parameters for %d steps", f"{param_count(model):,}", spec.steps)
    cfg = TrainConfig(steps=spec.steps, lr=spec.lr, warmup_steps=spec.warmup_steps, schedule="cosine")
    sampler = Sampler(tuple(pools), tuple(float(len(p)) for p in pools), spec.batch_size, seed)
    checkpoint = path.parent / f"{path.name}.checkpoint.safetensors"

    accelerator = make_accelerator(device)  # under a multi-process launch: data-parallel, the main one saves
    losses = train(model, sampler, cfg, checkpoint=checkpoint, desc="demo base", accelerator=accelerator)
    whole = gathered(model)  # an FSDP launch trained it sharded
    if is_main_process():
        save_checkpoint_dir(whole, tokenizer, path, extra={"spec": spec.model_dump(), "final_loss": losses[-1]})
        remove_checkpoint(checkpoint)
    accelerator.wait_for_everyone()
    return path
