"""An expert's weights as a read-only mapping over a memory-mapped safetensors file: a tensor is read when it
is asked for, so a merger can take task vectors tensor by tensor without holding any expert in memory."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from mergemix.merge.check import Spec, file_specs


class SafetensorsState(Mapping[str, torch.Tensor]):
    """name → tensor of one safetensors file, read on access (`specs` from the header, without reading)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.specs: dict[str, Spec] = file_specs(self.path)
        self._file = safe_open(str(self.path), framework="pt")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.specs:
            raise KeyError(name)
        return self._file.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __contains__(self, name: object) -> bool:
        return name in self.specs
