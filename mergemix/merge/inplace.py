"""One resident model whose parameters are overwritten with Θ(α) for each trial.

Parameters are merged in groups: the tensors of a group are laid end to end in one flat buffer, merged in
steps of about CHUNK / K entries (a few tensor operations each into buffers that stay in cache, written
straight into the parameters) instead of a Python loop per tensor. What is kept, per parameter:

- the base: one copy in the model's dtype (the parameters themselves are overwritten by every merge), or,
  streamed with `base_files`, nothing: Θ_base is read from the base's own memory-mapped files;
- the K task vectors τ_k = Θ_k − Θ_base, already sparsified for TIES/DARE, in the model's dtype or float32
  (`merge.task_vectors`), as one [K, n] buffer per group; or nothing with `merge.stream`, where each merge
  reads the experts' tensors group by group from their memory-mapped safetensors files.

Sums accumulate in float32 (float64 for float64 parameters) whatever the storage. Streamed and resident
merges compute every tensor the same way, so they give the same bits. For the fp32 demo model, resident
memory is 4 (K + 1) bytes per parameter, streamed memory 4 (0 with `base_files`), plus one group's working
buffers (`merge.memory_mb`).

LoRA experts (mergemix.merge.lora) keep only their factors. A linear merge adds Σ α_k s_k B_k A_k, formed one
weight at a time from the factors, to the full experts' weighted sum, so their task vectors never exist; a
LoRA expert's task vector is zero on weights it does not adapt. TIES and DARE need each expert's own task
vector to trim or drop: for them a LoRA expert's s B A is formed per tensor and then kept like a full
expert's (or formed again per merge with `merge.stream`).

A model sharded with FSDP2 (torch's `fully_shard`, one process of a multi-process launch) is merged shard by
shard: each process keeps and merges only its own rows (dim 0, torch.chunk's split) of every parameter, in
place in the parameter's local tensor, so base copy and task vectors take 1/N of the memory on each of N
processes. Its task vectors are read row by row from the experts' memory-mapped files (a LoRA expert forms
B[rows] A). TIES and DARE act on the whole tensor (TIES trims by magnitude over it, DARE draws per tensor),
so for them the whole tensor's task vector is formed, one tensor at a time, and the process's rows kept. Every
operation is element-wise over experts, so a shard merges to the unsharded merge's numbers (the same bits
where torch sums the experts in the same order: see `_chunks`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor

from mergemix.artifacts import stable_hash
from mergemix.catalog import MERGE_METHODS
from mergemix.collective import shard_rows
from mergemix.errors import MergemixError
from mergemix.merge.check import first_mismatch, tensor_specs
from mergemix.merge.lazy import SafetensorsState
from mergemix.merge.lora import Factors, LoraExpert, weighted_delta
from mergemix.merge.methods import combine, finish
from mergemix.recipe import MergeSpec

log = logging.getLogger(__name__)

Expert = Mapping[str, torch.Tensor] | LoraExpert
Experts = Sequence[Expert] | Mapping[str, Expert]
CHUNK = 1 << 17  # weighted task-vector entries per step (K × step): 512 KiB of float32, held in L2
# (benchmarks/merge_speed.py, 22M parameters, K = 4: 2^17 5.34 copies, 2^16 5.82, 2^18 5.47, 2^20 5.87)
ALIGN = 256  # entries: steps inside a tensor start at multiples of this from its start (see _chunks)


@dataclass
class _Chunk:
    """Entries s:e of a group merged in one step, and where they go: `dests`, slices of the parameters'
    storage (flat) of `sizes` entries each, end to end."""

    s: int
    e: int
    dests: list[torch.Tensor]
    sizes: list[int]


@dataclass
class _Group:
    """Parameters of one dtype merged together: names, their shapes and element counts, the base (flat)."""

    names: list[str]
    shapes: list[torch.Size]
    numels: list[int]
    base: torch.Tensor | None  # flat, the model's dtype; None when read from the base's files (`base_files`)
    taus: torch.Tensor | None = None  # [rows, n] when resident (see InPlaceMerger.rows)
    chunks: list[_Chunk] = field(default_factory=list)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [c.view(s) for c, s in zip(flat.split(self.numels), self.shapes, strict=True)]


def _chunks(numels: Sequence[int], flats: Sequence[torch.Tensor], size: int) -> list[_Chunk]:
    """Steps of at most about `size` entries over parameters laid end to end (`flats`: each one's storage).

    torch sums over experts in one order in its vectorized loop and in another in the scalar loop that ends
    a tensor (its last numel mod 32 entries on AVX-512, with K ≥ 5), so an entry gives mergekit's bits only
    if it lies in the same loop in both: a step starts at a tensor's start or ALIGN entries after a step
    start, and a tensor whose size is not a multiple of ALIGN ends its step. A tensor over `size` entries is
    cut into steps of its own; smaller consecutive ones share one."""
    size = max(ALIGN, size // ALIGN * ALIGN)
    cuts: list[tuple[int, int]] = []  # (start, end) in the group
    pos = start = 0  # start: where the open step begins
    for numel in numels:
        end = pos + numel
        if numel > size:
            if start < pos:
                cuts.append((start, pos))
            pieces = -(-numel // size)
            step = -(-numel // (pieces * ALIGN)) * ALIGN
            cuts.extend((b, min(b + step, end)) for b in range(pos, end, step))
            start = end
        else:
            if end - start > size:
                cuts.append((start, pos))
                start = pos
            if numel % ALIGN:
                cuts.append((start, end))
                start = end
        pos = end
    if start < pos:
        cuts.append((start, pos))
    ends = [0]
    for numel in numels:
        ends.append(ends[-1] + numel)
    out, first = [], 0
    for s, e in cuts:
        while ends[first + 1] <= s:
            first += 1
        dests, sizes, i = [], [], first
        while i < len(flats) and ends[i] < e:
            lo, hi = max(s, ends[i]), min(e, ends[i + 1])
            if hi > lo:
                dests.append(flats[i][lo - ends[i]:hi - ends[i]])
                sizes.append(hi - lo)
            i += 1
        out.append(_Chunk(s, e, dests, sizes))
    return out


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(state: Mapping[str, torch.Tensor], name: str, rows: slice | None) -> torch.Tensor:
    """Tensor `name` of `state`, or its rows `rows` (read alone from a memory-mapped file)."""
    if rows is None:
        return state[name]
    if isinstance(state, SafetensorsState):
        return state.rows(name, rows)
    return state[name][rows]


class InPlaceMerger:
    """Writes merges of K experts into `model`'s parameters in place.

    `experts` maps parameter name → expert tensor for each expert, or is a LoraExpert, in the order of
    `alpha`'s entries (a mapping expert name → state names them in errors and seeds DARE's draws); parameters
    an expert does not carry or adapt are taken from the base (their task vector is zero). An expert tensor the base lacks, or of another
    shape or dtype, is a MergemixError naming the expert and the tensor, raised before anything is computed.
    `spec` is the recipe's merge section (or just a method name); `seed` seeds DARE's drops, drawn once per
    expert and tensor, so every trial sees the same sparsified task vectors. `base_files`: the base's tensors as
    saved (e.g. a SafetensorsState over its checkpoint); with `merge.stream`, Θ_base is read from them for each
    merge instead of kept as a copy, for every group whose saved tensors equal the parameters (checked here).

    A `model` sharded with FSDP2 is merged shard by shard (see the module's docstring): every process of the
    launch builds its merger and merges the same α in step (TIES/DARE gather each tensor's base once, here,
    and with `merge.stream` in every merge); `base` and `merged_state` are then this process's rows.
    """

    def __init__(self, model: torch.nn.Module, experts: Experts, spec: MergeSpec | str = "linear", seed: int = 0,
                 base_files: Mapping[str, torch.Tensor] | None = None):
        self.model = model
        self.spec = MergeSpec(method=spec) if isinstance(spec, str) else spec
        self.method = MERGE_METHODS.get(self.spec.method)
        named = dict(experts) if isinstance(experts, Mapping) else {f"#{i}": e for i, e in enumerate(experts)}
        self.params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
        # what this process writes of each parameter (its local tensor), and which rows of it (None: all)
        self.local, self.shard = {}, {}
        for n, p in self.params.items():
            self.local[n], self.shard[n] = shard_rows(p)
        base_specs = tensor_specs(self.params)
        for expert_name, state in named.items():
            problem = (state.mismatch(base_specs) if isinstance(state, LoraExpert)
                       else first_mismatch(base_specs, tensor_specs(state), complete=False))
            if problem is not None:
                raise MergemixError(f"expert {expert_name}: cannot merge it into the base: {problem}")
        self.expert_names = list(named)
        self.experts = list(named.values())
        self.k = len(self.experts)
        self.seed = seed
        self.rescale = self.method.rescale if self.spec.rescale is None else self.spec.rescale
        self.normalize = self.method.normalize if self.spec.normalize is None else self.spec.normalize
        loras = [k for k, e in enumerate(self.experts) if isinstance(e, LoraExpert)]
        # A linear merge takes LoRA experts through their factors; the stacked task vectors are the others'.
        self.low_rank = bool(loras) and self.method.sparsify is None and not self.method.consensus
        self.rows = [k for k in range(self.k) if not (self.low_rank and k in loras)]
        self.factors: dict[str, list[tuple[int, Factors]]] = {}  # weight → (expert, its factors), low_rank only
        if self.low_rank:
            device = next(iter(self.params.values())).device
            for k in loras:
                for name, f in self.experts[k].items():
                    rows = self.shard[name]
                    self.factors.setdefault(name, []).append((k, (f if rows is None else f.rows(rows)).to(device)))
        self.base_files = base_files if self.spec.stream else None
        self.groups = self._plan()
        self._work: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        if not self.spec.stream:
            for g in self.groups:
                g.taus = self._task_vectors(g, self._base(g))
            self.experts = []  # nothing read from them again

    def _plan(self) -> list[_Group]:
        """Consecutive parameters of one dtype, up to the working-memory budget per group (a larger tensor is
        a group of its own). Each merge step holds about 2K + 4 float32 buffers of a group's size (and two
        more for the LoRA experts' sum). Planned on the whole parameters' sizes, so every process of a sharded
        merge has the same groups (and makes its collectives in the same order)."""
        limit = max(1, int(self.spec.memory_mb * 2**20) // ((2 * self.k + 4 + 2 * bool(self.factors)) * 4))
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
            ps = [self.local[n] for n in names]
            numels = [p.numel() for p in ps]
            base = None if self._saved(names) else torch.cat([p.reshape(-1) for p in ps])
            out.append(_Group(names, [p.shape for p in ps], numels, base,
                              chunks=_chunks(numels, [p.view(-1) for p in ps], CHUNK // max(1, len(self.rows)))))
        return out

    def _saved(self, names: Sequence[str]) -> bool:
        """Whether the base's files (`base_files`, streamed merges only) hold exactly these parameters (cast to
        their dtype), so that Θ_base can be read from them for every merge instead of kept as a copy."""
        if self.base_files is None:
            return False
        for n in names:
            p = self.local[n]
            if n not in self.base_files or not torch.equal(self._read(n), p):
                log.info("%s differs from the base's file: the merger keeps a copy of its group", n)
                return False
        return True

    def _read(self, name: str) -> torch.Tensor:
        assert self.base_files is not None
        p = self.local[name]
        return _rows(self.base_files, name, self.shard[name]).to(device=p.device, dtype=p.dtype)

    def _base(self, g: _Group) -> torch.Tensor:
        """Θ_base of group `g`, flat: the copy, or read from the base's files."""
        if g.base is not None:
            return g.base
        return torch.cat([self._read(n).reshape(-1) for n in g.names])

    @property
    def base(self) -> dict[str, torch.Tensor]:
        """name → Θ_base (views of the copies; read from the base's files where the merger keeps none); of a
        sharded model, this process's rows."""
        return {n: v for g in self.groups for n, v in zip(g.names, g.views(self._base(g)), strict=True)}

    def _storage(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if self.spec.task_vectors == "float32" else dtype

    def _task_vectors(self, g: _Group, base: torch.Tensor) -> torch.Tensor:
        """[rows, n] sparsified task vectors of group `g` (Θ_base flat: `base`) in the storage dtype, from the
        experts' tensors (a LoRA expert's: s B A, formed per tensor), one tensor at a time for all experts."""
        out = torch.empty((len(self.rows), base.numel()), dtype=self._storage(base.dtype), device=base.device)
        views = [g.views(out[row]) for row in range(len(self.rows))]
        for i, (name, b) in enumerate(zip(g.names, g.views(base), strict=True)):
            carried = any(name in self.experts[k] for k in self.rows)
            whole = self._whole_base(name, b) if carried else None
            for row, k in enumerate(self.rows):
                if name in self.experts[k]:
                    views[row][i].copy_(self._task_vector(k, name, b, whole))
                else:
                    views[row][i].zero_()
        return out

    def _whole_base(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        """Θ_base of the whole tensor `name`, gathered from every process's rows (`base`: this process's), where
        TIES or DARE must act on the whole tensor of a sharded parameter; else None. Gathered once per tensor
        for all experts; a collective, so every process asks for the same tensors in the same order."""
        if self.shard[name] is None or self.method.sparsify is None:
            return None
        p = self.params[name]
        return DTensor.from_local(base, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()

    def _task_vector(self, k: int, name: str, base: torch.Tensor, whole: torch.Tensor | None) -> torch.Tensor:
        """Expert `k`'s task vector of this process's rows of `name` (their Θ_base: `base`), sparsified, in the
        accumulation dtype. TIES and DARE act on the whole tensor: of a sharded parameter, the whole tensor's
        task vector is formed from `whole` (`_whole_base`) and this process's rows kept."""
        acc = _accumulator(base.dtype)
        rows = self.shard[name]
        read = rows if whole is None else None
        if whole is not None:
            base = whole
        state = self.experts[k]
        if isinstance(state, LoraExpert):
            one = torch.ones(1, dtype=acc, device=base.device)
            f = state[name] if read is None else state[name].rows(read)
            tau = weighted_delta([f.to(base.device)], one, acc)
        else:
            tau = _rows(state, name, read).to(device=base.device, dtype=acc) - base.to(acc)
        if self.method.sparsify is not None:
            tau = self.method.sparsify(tau, self.spec.density, self.rescale, self._generator(k, name, base))
        return tau if whole is None else tau[rows]

    def _generator(self, k: int, name: str, like: torch.Tensor) -> torch.Generator:
        """DARE's draws for one expert and tensor: seeded by the run's seed, the expert's name and the tensor's,
        so they do not depend on grouping, streaming or the order of experts."""
        seed = int(stable_hash([self.seed, self.expert_names[k], name]), 16)
        return torch.Generator(device=like.device).manual_seed(seed)

    def _low_rank(self, g: _Group, base: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
        """Σ α_k s_k B_k A_k of the LoRA experts over group `g`, flat in the accumulation dtype (zero on
        weights no adapter touches); None when no adapter touches the group. One weight at a time: one
        matmul of the factors side by side."""
        if not any(name in self.factors for name in g.names):
            return None
        acc = _accumulator(base.dtype)
        a = a.to(device=base.device, dtype=acc)
        parts = []
        for name, numel in zip(g.names, g.numels, strict=True):
            if name in self.factors:
                ks, fs = zip(*self.factors[name], strict=True)
                parts.append(weighted_delta(fs, a[list(ks)], acc).reshape(-1))
            else:
                parts.append(torch.zeros(numel, dtype=acc, device=base.device))
        return torch.cat(parts)

    def _merged(self, base: torch.Tensor, a: torch.Tensor, taus: torch.Tensor, low: torch.Tensor | None) -> torch.Tensor:
        """Θ(α) of a group (Θ_base flat: `base`) in the accumulation dtype, in one piece and differentiable in
        `a`; `low` is `_low_rank`'s sum."""
        acc = _accumulator(base.dtype)
        a = a.to(device=taus.device, dtype=acc)
        if not self.low_rank:
            mixed = combine(taus.to(acc), a, self.spec.sign if self.method.consensus else None,
                            self.normalize, self.spec.scale)
        else:
            mixed = combine(taus.to(acc), a[self.rows])
            if low is not None:
                mixed = mixed + low
            mixed = finish(mixed, a.sum(), self.normalize, self.spec.scale)
        return base.to(acc) + mixed

    def _alpha(self, alpha: Sequence[float] | torch.Tensor) -> torch.Tensor:
        a = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(list(alpha), dtype=torch.float32)
        if a.shape != (self.k,):
            raise ValueError(f"alpha has {tuple(a.shape)} entries, expected ({self.k},)")
        return a

    def _buffers(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's working buffers in accumulation dtype `dtype`, kept between merges (a fresh buffer per
        step would cost a page fault per 4 KiB): the weighted task vectors [rows, step] and their sum."""
        key = (dtype, device)
        if key not in self._work:
            step = max((c.e - c.s for g in self.groups for c in g.chunks), default=0)
            self._work[key] = (torch.empty((len(self.rows), step), dtype=dtype, device=device),
                               torch.empty(step, dtype=dtype, device=device))
        return self._work[key]

    @torch.no_grad()
    def apply(self, alpha: Sequence[float] | torch.Tensor) -> None:
        """Set the model to the merge with weights `alpha` (one per expert).

        A group is merged a step (CHUNK / K entries) at a time into preallocated buffers that stay in cache, so
        memory sees one read of the K task vectors and the base and one write of the parameters, and every
        entry sees mergekit's operations in mergekit's order: w_k τ_k for all k, their sum over k, the base
        plus that sum."""
        a = self._alpha(alpha)
        for g in self.groups:
            base = self._base(g)
            taus = g.taus if g.taus is not None else self._task_vectors(g, base)
            acc = _accumulator(base.dtype)
            weights, mixed = self._buffers(acc, taus.device)
            all_w = a.to(device=taus.device, dtype=acc).reshape(-1, 1)
            w, total = all_w[self.rows], all_w.sum(dim=0)
            consensus = self.spec.sign if self.method.consensus and not self.low_rank else None
            low = self._low_rank(g, base, a)
            for c in g.chunks:
                n = c.e - c.s
                if consensus is not None:
                    out = combine(taus[:, c.s:c.e].to(acc), all_w.view(-1), consensus, self.normalize,
                                  self.spec.scale)
                else:
                    out = mixed[:n]
                    torch.sum(torch.mul(taus[:, c.s:c.e], w, out=weights[:, :n]), dim=0, out=out)
                    if low is not None:
                        out += low[c.s:c.e]
                    finish(out, total, self.normalize, self.spec.scale)
                if len(c.dests) == 1:
                    torch.add(base[c.s:c.e], out, out=c.dests[0])
                else:
                    torch._foreach_copy_(c.dests, list((base[c.s:c.e] + out).to(base.dtype).split(c.sizes)))

    def merged_state(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """Θ(α) as new tensors (name → tensor), differentiable in `alpha`: for gradient-based search with
        `torch.func.functional_call(model, merger.merged_state(alpha), inputs)`. The model is not changed. Of
        a sharded model, this process's rows only (what the gradient strategy differentiates there:
        mergemix.run.scoring)."""
        a = self._alpha(alpha)
        out = {}
        for g in self.groups:
            base = self._base(g)
            taus = g.taus if g.taus is not None else self._task_vectors(g, base)
            out.update(zip(g.names, g.views(self._merged(base, a, taus, self._low_rank(g, base, a))), strict=True))
        return out

    @torch.no_grad()
    def restore(self) -> None:
        """Put the base weights back."""
        for g in self.groups:
            torch._foreach_copy_([self.local[n] for n in g.names], g.views(self._base(g)))

    def close(self) -> None:
        """Put the base weights back and drop the copies kept to merge (base, task vectors): the memory is
        free for what follows, and the merger merges nothing any more."""
        self.restore()
        self.groups = []
