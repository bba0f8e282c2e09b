"""An expert's weights as a read-only mapping over memory-mapped safetensors files (one, or a checkpoint's
shards): a tensor is read when it is asked for, so a merger can take task vectors tensor by tensor without holding any expert in memory."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from mergemix.merge.check import Spec, dtype_code, file_specs


class SafetensorsState(Mapping[str, torch.Tensor]):
    """name → tensor of safetensors files, read on access (`specs` from the headers, without reading). With
    `cast`, every tensor is read as that dtype (an expert saved in another dtype than the base's)."""

    def __init__(self, paths: str | Path | Sequence[str | Path], cast: torch.dtype | None = None) -> None:
        self.paths = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
        self.cast = cast
        self.specs: dict[str, Spec] = {}
        self._where: dict[str, int] = {}
        for i, path in enumerate(self.paths):
            specs = file_specs(path)
            if cast is not None:
                specs = {k: (shape, dtype_code(cast)) for k, (shape, _) in specs.items()}
            self.specs.update(specs)
            self._where.update(dict.fromkeys(specs, i))
        self._files = [safe_open(str(p), framework="pt") for p in self.paths]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.specs:
            raise KeyError(name)
        t = self._files[self._where[name]].get_tensor(name)
        return t if self.cast is None else t.to(self.cast)

    def rows(self, name: str, rows: slice) -> torch.Tensor:
        """Rows `rows` (dim 0) of tensor `name`, read alone from the memory-mapped file: a process that merges
        one shard of every parameter (FSDP2) reads only its own rows of each expert."""
        if name not in self.specs:
            raise KeyError(name)
        t = self._files[self._where[name]].get_slice(name)[rows.start:rows.stop]
        return t if self.cast is None else t.to(self.cast)

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __contains__(self, name: object) -> bool:
        return name in self.specs


def checkpoint_state(directory: str | Path) -> SafetensorsState | None:
    """The weights of a Hugging Face checkpoint directory (model.safetensors or its shards) read on access, or
    None when it holds no safetensors file."""
    files = sorted(Path(directory).glob("model*.safetensors"))
    return SafetensorsState(files) if files else None
