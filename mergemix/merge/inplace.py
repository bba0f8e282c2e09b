"""One resident model whose parameters are overwritten with Θ(α) for each trial.

Parameters are merged in groups: the tensors of a group are laid end to end in one flat buffer, so a merge
is a few large tensor operations per group (the weighted sum over K, a sign election for TIES) instead of a
Python loop per tensor. What is kept, per parameter:

- the base: one copy in the model's dtype (the parameters themselves are overwritten by every merge);
- the K task vectors τ_k = Θ_k − Θ_base, already sparsified for TIES/DARE, in the model's dtype or float32
  (`merge.task_vectors`), as one [K, n] buffer per group; or nothing with `merge.stream`, where each merge
  reads the experts' tensors group by group from their memory-mapped safetensors files.

Sums accumulate in float32 (float64 for float64 parameters) whatever the storage. Streamed and resident
merges compute every tensor the same way, so they give the same bits. For the fp32 demo model, resident
memory is 4 (K + 1) bytes per parameter plus one group's working buffers (`merge.memory_mb`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mergemix.artifacts import stable_hash
from mergemix.errors import MergemixError
from mergemix.merge.check import first_mismatch, tensor_specs
from mergemix.merge.methods import MERGE_METHODS, combine
from mergemix.recipe import MergeSpec

log = logging.getLogger(__name__)

Experts = Sequence[Mapping[str, torch.Tensor]] | Mapping[str, Mapping[str, torch.Tensor]]


@dataclass
class _Group:
    """Parameters of one dtype merged together: names, their shapes and element counts, the base (flat)."""

    names: list[str]
    shapes: list[torch.Size]
    numels: list[int]
    base: torch.Tensor  # flat, the model's dtype
    taus: torch.Tensor | None = None  # [K, n] when resident

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [c.view(s) for c, s in zip(flat.split(self.numels), self.shapes, strict=True)]


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class InPlaceMerger:
    """Writes merges of K experts into `model`'s parameters in place.

    `experts` maps parameter name → expert tensor for each expert, in the order of `alpha`'s entries (a
    mapping expert name → state names them in errors and seeds DARE's draws); parameters an expert does not
    carry are taken from the base (their task vector is zero). An expert tensor the base lacks, or of another
    shape or dtype, is a MergemixError naming the expert and the tensor, raised before anything is computed.
    `spec` is the recipe's merge section (or just a method name); `seed` seeds DARE's drops, drawn once per
    expert and tensor, so every trial sees the same sparsified task vectors.
    """

    def __init__(self, model: torch.nn.Module, experts: Experts, spec: MergeSpec | str = "linear", seed: int = 0):
        self.model = model
        self.spec = MergeSpec(method=spec) if isinstance(spec, str) else spec
        self.method = MERGE_METHODS.get(self.spec.method)
        named = dict(experts) if isinstance(experts, Mapping) else {f"#{i}": e for i, e in enumerate(experts)}
        self.params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
        base_specs = tensor_specs(self.params)
        for expert_name, state in named.items():
            problem = first_mismatch(base_specs, tensor_specs(state), complete=False)
            if problem is not None:
                raise MergemixError(f"expert {expert_name}: cannot merge it into the base: {problem}")
        self.expert_names = list(named)
        self.experts = list(named.values())
        self.k = len(self.experts)
        self.seed = seed
        self.rescale = self.method.rescale if self.spec.rescale is None else self.spec.rescale
        self.normalize = self.method.normalize if self.spec.normalize is None else self.spec.normalize
        self.groups = self._plan()
        self.base = {n: v for g in self.groups for n, v in zip(g.names, g.views(g.base), strict=True)}
        if not self.spec.stream:
            for g in self.groups:
                g.taus = self._task_vectors(g)
            self.experts = []  # nothing read from them again

    def _plan(self) -> list[_Group]:
        """Consecutive parameters of one dtype, up to the working-memory budget per group (a larger tensor is
        a group of its own). Each merge step holds about 2K + 4 float32 buffers of a group's size."""
        limit = max(1, int(self.spec.memory_mb * 2**20) // ((2 * self.k + 4) * 4))
        groups: list[list[str]] = []
        for name, p in self.params.items():
            last = groups[-1] if groups else None
            if (last is None or self.params[last[0]].dtype != p.dtype
                    or sum(self.params[n].numel() for n in last) + p.numel() > limit):
                groups.append([name])
            else:
                last.append(name)
        out = []
        for names in groups:
            ps = [self.params[n].detach() for n in names]
            base = torch.cat([p.reshape(-1) for p in ps]) if len(ps) > 1 else ps[0].reshape(-1).clone()
            out.append(_Group(names, [p.shape for p in ps], [p.numel() for p in ps], base))
        return out

    def _storage(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if self.spec.task_vectors == "float32" else dtype

    def _task_vectors(self, g: _Group) -> torch.Tensor:
        """[K, n] sparsified task vectors of group `g` in the storage dtype, from the experts' tensors."""
        base = g.base
        acc = _accumulator(base.dtype)
        out = torch.empty((self.k, base.numel()), dtype=self._storage(base.dtype), device=base.device)
        bases = g.views(base)
        for k, state in enumerate(self.experts):
            for name, b, o in zip(g.names, bases, g.views(out[k]), strict=True):
                if name not in state:
                    o.zero_()
                    continue
                tau = state[name].to(device=b.device, dtype=acc) - b.to(acc)
                if self.method.sparsify is not None:
                    tau = self.method.sparsify(tau, self.spec.density, self.rescale, self._generator(k, name, b))
                o.copy_(tau)
        return out

    def _generator(self, k: int, name: str, like: torch.Tensor) -> torch.Generator:
        """DARE's draws for one expert and tensor: seeded by the run's seed, the expert's name and the tensor's,
        so they do not depend on grouping, streaming or the order of experts."""
        seed = int(stable_hash([self.seed, self.expert_names[k], name]), 16)
        return torch.Generator(device=like.device).manual_seed(seed)

    def _merged(self, g: _Group, a: torch.Tensor) -> torch.Tensor:
        taus = g.taus if g.taus is not None else self._task_vectors(g)
        acc = _accumulator(g.base.dtype)
        mixed = combine(taus.to(acc), a.to(device=taus.device, dtype=acc),
                        self.spec.sign if self.method.consensus else None, self.normalize, self.spec.scale)
        return g.base.to(acc) + mixed

    def _alpha(self, alpha: Sequence[float] | torch.Tensor) -> torch.Tensor:
        a = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(list(alpha), dtype=torch.float32)
        if a.shape != (self.k,):
            raise ValueError(f"alpha has {tuple(a.shape)} entries, expected ({self.k},)")
        return a

    @torch.no_grad()
    def apply(self, alpha: Sequence[float] | torch.Tensor) -> None:
        """Set the model to the merge with weights `alpha` (one per expert)."""
        a = self._alpha(alpha)
        for g in self.groups:
            merged = self._merged(g, a).to(g.base.dtype)
            torch._foreach_copy_([self.params[n] for n in g.names], g.views(merged))

    def merged_state(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """Θ(α) as new tensors (name → tensor), differentiable in `alpha`: for gradient-based search with
        `torch.func.functional_call(model, merger.merged_state(alpha), inputs)`. The model is not changed."""
        a = self._alpha(alpha)
        return {n: v for g in self.groups for n, v in zip(g.names, g.views(self._merged(g, a)), strict=True)}

    @torch.no_grad()
    def restore(self) -> None:
        """Put the base weights back."""
        for g in self.groups:
            torch._foreach_copy_([self.params[n] for n in g.names], g.views(g.base))
