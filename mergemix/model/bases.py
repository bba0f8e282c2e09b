"""`base.path` → a Hugging Face checkpoint directory: a directory as it is, a GGUF file converted once, a
packaged model's GGUF file found where pip put it (`mergemix.model.packaged`).

A GGUF file is loaded through transformers' GGUF support (the `gguf` package: `mergemix[gguf]`), dequantized
to float32, and saved as an ordinary safetensors checkpoint in `cache_dir/bases/`, keyed by the file's
fingerprint and the converting libraries' versions; from then on it takes the path every checkpoint takes
(experts, merging, export). Weights dequantized from a quantized file are a real model, but not bit-equal
to the weights the file was quantized from: the tensor types are logged and recorded in proposal.json.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from mergemix.artifacts import Hasher, atomic_path
from mergemix.catalog import PACKAGED
from mergemix.errors import MergemixError
from mergemix.model.packaged import is_packaged, packaged_file

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
CONVERSION_VERSION = 1  # bump when the conversion changes what it writes
INSTALL_GGUF = "pip install 'mergemix[gguf]'"
FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}  # GGUF tensor types that hold weights exactly


@dataclass(frozen=True)
class BaseSource:
    """Where the base came from, for the logs and proposal.json. `path` is `base.path` as the recipe gives
    it (a packaged name stays a name, so proposal.json does not depend on the machine)."""

    path: str | None
    format: str  # "demo", "hf" or "gguf"
    gguf_file: str | None = None
    architecture: str | None = None
    # GGUF tensor type → tensors of that type ("Q4_1": 210, "F32": 61, ...); empty unless format is gguf
    tensor_types: dict[str, int] = field(default_factory=dict)

    @property
    def quantization(self) -> str:
        return ", ".join(f"{t} x{n}" for t, n in sorted(self.tensor_types.items(), key=lambda kv: -kv[1]))

    @property
    def quantized(self) -> bool:
        return any(t not in FLOAT_TYPES for t in self.tensor_types)

    def record(self) -> dict[str, object]:
        out: dict[str, object] = {"path": self.path, "format": self.format}
        if self.format == "gguf":
            out |= {"gguf_file": self.gguf_file, "architecture": self.architecture,
                    "tensor_types": dict(sorted(self.tensor_types.items())), "quantization": self.quantization}
        return out


def _file_key(path: Path) -> str:
    """The GGUF file's identity (name, size, sampled bytes) and the versions of what converts it."""
    import gguf
    import transformers

    versions = f"{CONVERSION_VERSION}:{transformers.__version__}:{getattr(gguf, '__version__', '')}"
    return Hasher().update_sampled(path).update(versions).hexdigest()


def _check_gguf(path: Path) -> None:
    """Refuse, in one line, a file that is no GGUF file, or one that cannot be read without the gguf package."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise MergemixError(f"base.path: cannot read {path}: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise MergemixError(f"base.path: {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
                            "give a .gguf file, a Hugging Face checkpoint directory or a packaged model name")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise MergemixError(f"base.path: {path} is a GGUF file, and reading it needs the gguf package: "
                            f"{INSTALL_GGUF}") from None


def _read_header(path: Path) -> BaseSource:
    """Architecture and tensor types from the file's header, refusing what cannot become a base. Parsing a
    header reads every metadata field (SmolLM2's 49k-token vocabulary: 1.7 s and ~0.15 GiB of Python objects
    on the heap of every process), so it is done once, at conversion (`_converted_source` reads the record after)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError) as e:
        raise MergemixError(f"base.path: {path}: cannot read it as GGUF ({e}); the file is truncated or "
                            "corrupt: fetch or convert it again") from None

    def text(key: str) -> str | None:
        fld = reader.fields.get(key)
        return None if fld is None else bytes(fld.parts[fld.data[0]]).decode("utf-8", "replace")

    if "tokenizer.ggml.eos_token_id" not in reader.fields:
        raise MergemixError(f"base.path: {path} has no EOS token (tokenizer.ggml.eos_token_id), which mergemix "
                            "puts between packed documents; write a copy that names one (gguf-new-metadata "
                            f"{path.name} OUT.gguf --special-token eos TOKEN) or give a checkpoint directory whose "
                            "tokenizer sets eos_token")
    types = Counter(gguf.GGMLQuantizationType(int(t.tensor_type)).name for t in reader.tensors)
    return BaseSource(path=None, format="gguf", gguf_file=path.name, architecture=text("general.architecture"),
                      tensor_types=dict(types))


def _convert(path: Path, source: BaseSource, target: Path) -> None:
    """Load the GGUF through transformers (dequantized, float32) and save it as a checkpoint directory."""
    from mergemix.model.modeling import quiet_transformers

    quiet_transformers()
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("base: converting %s (%s, %s) to a float32 checkpoint in %s", path.name, source.architecture,
             source.quantization, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    except (ValueError, KeyError, NotImplementedError, RuntimeError, TypeError) as e:
        what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "not supported" in what and source.architecture:
            what = (f"transformers {transformers.__version__} cannot load GGUF architecture "
                    f"{source.architecture!r}")
        raise MergemixError(f"base.path: {path}: {what}; convert the model to a Hugging Face checkpoint "
                            "directory with the tool that made it, and give that directory") from None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are plain float tensors by now; transformers refuses to save
        quantizer.remove_quantization_config(model)  # a model that still carries the GGUF quantizer
    with atomic_path(target) as tmp:
        tmp.unlink()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "mergemix.json").write_text(json.dumps({"converted_from": source.record()}, indent=2))


def _converted_source(target: Path) -> BaseSource | None:
    """The source recorded in a finished conversion's mergemix.json (`_convert`), or None when `target` holds
    none (not converted yet)."""
    if not (target / "config.json").is_file():
        return None
    try:
        record = json.loads((target / "mergemix.json").read_text())["converted_from"]
        return BaseSource(path=record["path"], format="gguf", gguf_file=record["gguf_file"],
                          architecture=record["architecture"], tensor_types=dict(record["tensor_types"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_base(path: str, cache_dir: Path) -> tuple[Path, BaseSource]:
    """The checkpoint directory that `base.path` stands for, converting a GGUF file the first time."""
    packaged = is_packaged(path)
    if not packaged and Path(path).suffix.lower() != ".gguf":
        close = difflib.get_close_matches(path, list(PACKAGED), n=1)
        if close and not Path(path).exists():
            raise MergemixError(f"base.path: {path} does not exist; did you mean the packaged model {close[0]!r}?")
        return Path(path), BaseSource(path=path, format="hf")
    file = packaged_file(path, cache_dir) if packaged else Path(path)
    if not file.is_file():
        raise MergemixError(f"base.path: {file} does not exist (a .gguf path is read as a GGUF file)")
    _check_gguf(file)
    target = Path(cache_dir) / "bases" / f"gguf-{file.stem}-{_file_key(file)}"
    converted = _converted_source(target)
    if converted is not None:
        source = replace(converted, path=path)
        log.info("base: reusing %s, converted from %s", target, file.name)
    else:
        source = replace(_read_header(file), path=path)
        _convert(file, source, target)
    if source.quantized:
        log.info("base: %s is a %s GGUF (%s), dequantized to float32: a real model, not bit-equal to the "
                 "weights it was quantized from", file.name, source.architecture, source.quantization)
    else:
        log.info("base: %s is a %s GGUF of float weights (%s)", file.name, source.architecture, source.quantization)
    return target, source
