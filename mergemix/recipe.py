"""The recipe: one YAML file, validated by pydantic, that says everything a run does.

Models are frozen and reject unknown keys. Field descriptions are the reference for every option.
Errors are reported as `FILE: dotted.field: what is wrong, got VALUE`.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from mergemix.catalog import BENCHMARK_KINDS, CHANCE_METRICS, MERGE_METHODS, STRATEGIES, SURROGATES
from mergemix.errors import MergemixError
from mergemix.feasible import Bounds

# Names become directory names and dotted override keys: no dots, no slashes.
NAME = r"^[A-Za-z0-9_][A-Za-z0-9_-]*$"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DemoBaseSpec(_Model):
    """The tiny Llama-style base that mergemix builds and pre-trains itself when no checkpoint is given.

    Sizing (docs/fidelity.md, "Sizing notes"): 128/2/512 is 0.8M parameters and trains at ~22k tokens/s on 2 CPU cores;
    for a fixed two minutes it beat a 2.75M model on held-out loss in every domain.
    """

    hidden: int = Field(128, gt=0, description="hidden size (model width)")
    layers: int = Field(2, gt=0, description="number of transformer layers")
    heads: int = Field(4, gt=0, description="attention heads; must divide hidden")
    ffn: int = Field(512, gt=0, description="MLP inner size")
    vocab: int = Field(2048, ge=300, description="byte-level BPE vocabulary trained locally on the base pool")
    steps: int = Field(1000, gt=0, description="pre-training steps on the general mix of the domains' base pools")
    lr: float = Field(5e-3, gt=0, description="peak learning rate (cosine decay to 10%)")
    warmup_steps: int = Field(50, ge=0, description="linear warmup steps")
    batch_size: int = Field(16, gt=0, description="sequences per step")

    @model_validator(mode="after")
    def _heads_divide(self) -> DemoBaseSpec:
        if self.hidden % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide hidden ({self.hidden})")
        return self


class BaseSpec(_Model):
    """Where the shared base checkpoint comes from."""

    path: str | None = Field(
        None,
        description="local Hugging Face causal-LM directory, a .gguf file (converted once; needs mergemix[gguf]) or a "
        "packaged model's name (`mergemix ls`); empty: build the demo base",
    )
    trust_remote_code: bool = Field(False, description="allow custom modeling code shipped with the checkpoint")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the model is loaded and trained in (task vectors are kept in float32)"
    )
    demo: DemoBaseSpec = Field(default_factory=DemoBaseSpec, description="the demo base, used when path is empty")


class DomainSpec(_Model):
    """One training domain: an expert is trained on it and the proposal gives its share."""

    name: str = Field(..., pattern=NAME, description="domain name (letters, digits, _ -)")
    source: str = Field(
        ...,
        description="built-in corpus `builtin:NAME`, or a path/glob: .jsonl/.json/.parquet/.txt/.md files "
        "or a directory written by datasets.save_to_disk",
    )
    format: Literal["auto", "jsonl", "json", "parquet", "text", "saved"] = Field(
        "auto", description="reader; `auto` picks it from the file suffix"
    )
    text_field: str = Field("text", description="field holding the text in jsonl/json/parquet/saved datasets")
    max_chars: int | None = Field(
        None, gt=0, description="use at most this many characters of text (documents in a seeded random order)"
    )
    available_tokens: int | None = Field(
        None,
        gt=0,
        description="tokens the team really has of this domain, for epochs in the proposal; "
        "default: the tokens read here",
    )
    megatron_prefix: str | None = Field(
        None, description="this domain's data prefix for `mergemix export --format megatron` (Megatron-LM's "
        "--data-path); default: the domain's name"
    )


class SplitSpec(_Model):
    """How each domain's documents are divided (at random, per document)."""

    heldout: float = Field(0.1, gt=0, lt=1, description="share kept out of all training, for held-out loss")
    base: float = Field(
        0.5, ge=0, lt=1, description="share used only to pre-train the demo base (default 0 when base.path is set)"
    )

    @model_validator(mode="after")
    def _sum(self) -> SplitSpec:
        if self.heldout + self.base >= 1:
            raise ValueError(f"heldout + base must be < 1 (the rest trains experts), got {self.heldout + self.base}")
        return self


class DataSpec(_Model):
    """The domains to mix, how their documents are split and how they are packed into blocks."""

    seq_len: int = Field(128, ge=8, description="tokens per packed training block")
    split: SplitSpec = Field(default_factory=SplitSpec, description="held-out / base / expert document split")
    domains: list[DomainSpec] = Field(..., min_length=2, description="the domains to mix (two or more)")

    @field_validator("domains")
    @classmethod
    def _unique(cls, v: list[DomainSpec]) -> list[DomainSpec]:
        names = [d.name for d in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"domain names must be unique, {', '.join(dup)} repeated")
        return v


class LoraSpec(_Model):
    """LoRA experts (peft): each expert trains low-rank adapters on the frozen base instead of all weights."""

    r: int = Field(8, gt=0, description="rank of each adapter")
    alpha: float = Field(16.0, gt=0, description="peft's lora_alpha: an adapter's update is (alpha / r) B A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input during training")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="modules given adapters, as peft's target_modules: names or name suffixes "
        "(e.g. [q_proj, v_proj]), or all-linear (every linear layer but the output head)")


class ExpertSpec(_Model):
    """One short, constant-learning-rate run per domain, all from the same base: full-parameter, or LoRA
    adapters with `lora`."""

    steps: int | None = Field(
        None, gt=0, description="optimizer steps per expert; tokens = steps x batch_size x seq_len"
    )
    tokens: int | None = Field(
        None, gt=0, description="token budget per expert (alternative to steps; rounded up to whole steps)"
    )
    batch_size: int = Field(16, gt=0, description="sequences per step (global, over all processes)")
    lr: float = Field(
        5e-4, gt=0, description="constant learning rate after warmup: your mid-training's (the report's runs use it "
        "unless report.lr is set); the default, the demo base's final rate, ranked best (docs/fidelity.md)",
    )
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    replay: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="share of every expert batch drawn from general data (all domains in token proportion); "
        "every alpha is then scored at merge weights (alpha - r x prior) / (1 - r). Evidence: docs/fidelity.md, Replay",
    )
    checkpoint_every: int = Field(50, gt=0, description="save a resumable checkpoint every this many steps")
    micro_batch_size: int | None = Field(
        None, gt=0, description="sequences per forward/backward on each process; gradients accumulate "
        "to the update of one full batch. Default: each process's whole share at once",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations during backward: less memory, about a third more compute"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="expert and report runs: bf16/fp16 autocast the forward pass (fp16 "
        "CUDA only, with a loss scaler), weights and AdamW state stay fp32; auto: bf16 on a CUDA GPU that has it",
    )
    lora: LoraSpec | None = Field(
        None, description="train peft LoRA adapters instead of full experts (merged without forming their task "
        "vectors for linear merges); unset: full-parameter experts",
    )
    checkpoints: dict[str, str] = Field(
        default_factory=dict, description="domain -> its expert trained elsewhere: a Hugging Face checkpoint or peft "
        "adapter directory of the base (checked before anything runs); the other domains are trained here"
    )
    replay_proportions: dict[str, float] | None = Field(
        None, description="the general data's domain proportions the experts replayed (with replay > 0: experts "
        "trained elsewhere); default: the token proportions of the data read here"
    )

    @model_validator(mode="after")
    def _budget(self) -> ExpertSpec:
        if self.steps is None and self.tokens is None:
            raise ValueError("set experts.steps or experts.tokens")
        if self.steps is not None and self.tokens is not None:
            raise ValueError("set experts.steps or experts.tokens, not both")
        for b in self.betas:
            if not 0 <= b < 1:
                raise ValueError(f"betas must lie in [0, 1), got {list(self.betas)}")
        if self.replay_proportions is not None and (
                any(v < 0 for v in self.replay_proportions.values()) or sum(self.replay_proportions.values()) <= 0):
            raise ValueError("replay_proportions must be >= 0 with a positive sum")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) must divide batch_size ({self.batch_size})")
        return self

    def train_fields(self) -> dict[str, Any]:
        """The fields that set how (not what) each step computes, as TrainConfig takes them."""
        return {"micro_batch_size": self.micro_batch_size, "gradient_checkpointing": self.gradient_checkpointing,
                "precision": self.precision}

    def num_steps(self, seq_len: int) -> int:
        if self.steps is not None:
            return self.steps
        assert self.tokens is not None
        return math.ceil(self.tokens / self.tokens_per_step(seq_len))

    def tokens_per_step(self, seq_len: int) -> int:
        """Tokens one optimizer step trains on (experts and mixture runs alike): batch_size x seq_len."""
        return self.batch_size * seq_len


class BenchmarkSpec(_Model):
    """A scored task. Kinds: `perplexity` (held-out loss on text; lower is better), `multiple_choice`
    (jsonl lines with `question`, `choices`, `answer` index, optional `blank`; scored by log-likelihood)
    and `generation` (jsonl lines with `question` and `answer` or `answers`; greedy answers after a few
    in-context examples, scored by exact match and token F1) and `lm_eval` (an lm-eval-harness task scored
    on the model in memory)."""

    name: str = Field(..., pattern=NAME, description="benchmark name (letters, digits, _ -)")
    kind: str = Field(..., description="benchmark kind: perplexity | multiple_choice | generation | lm_eval")
    path: str | None = Field(
        None, description="data file (jsonl/json/parquet/text) or `builtin:NAME`; for perplexity, "
        "alternatively `domain`"
    )
    domain: str | None = Field(None, description="perplexity only: score the held-out pool of this domain")
    task: str | None = Field(
        None, description="lm_eval only: lm-eval task name, or a folder/YAML file of task definitions "
        "(install with pip install 'mergemix[lmeval]')"
    )
    trust_task_code: bool = Field(
        False, description="lm_eval only: let a task folder's `!function` tags import and run its Python files "
        "(a task folder is code, like trust_remote_code; lm-eval's own tasks are always allowed)"
    )
    text_field: str = Field("text", description="perplexity: field holding the text in jsonl/json/parquet")
    metric: str | None = Field(
        None,
        description="metric that enters the objective, one of the kind's (`mergemix ls`; "
        "docs/guide.md, Benchmark formats); default: the kind's first",
    )
    capability: str = Field("general", description="capability group the benchmark belongs to")
    max_items: int | None = Field(None, gt=0, description="score at most this many items (blocks for perplexity)")
    ceiling: float | None = Field(
        None,
        description="metric value that normalizes to 1 (e.g. a strong model's accuracy). Default: 1 for "
        "accuracy-type metrics (chance → 0); for continuous ones the base → 0 and one unit is the spread "
        "of base and experts",
    )
    allow_test_split: bool = Field(
        False, description="allow optimizing on a file that looks like a test split (docs/guide.md, Split guard)"
    )
    question_template: str | None = Field(
        None,
        description="text made of each item's `{question}`: for multiple_choice the "
        "context the options follow, for generation each prompt (docs/guide.md, Benchmark formats)",
    )
    blank_template: str = Field(
        "{question} ___",
        description="multiple_choice blank_ppl: cloze text of items without a `blank` field; `___` or "
        "`{blank}` marks where each option goes",
    )
    instruction: str = Field(
        "Answer each question with a short answer.",
        description="generation: the one-line light instruction above the in-context examples (ICLiP)",
    )
    shots: int = Field(
        3, ge=0, description="generation: in-context examples, drawn with the recipe seed from the file and "
        "held out of the scored items"
    )
    stop: list[str] = Field(["\n"], description="generation: the answer ends before the first of these strings")
    max_new_tokens: int = Field(16, gt=0, description="generation: most tokens generated per answer")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        return BENCHMARK_KINDS.check(v)

    @model_validator(mode="after")
    def _source(self) -> BenchmarkSpec:
        if (self.kind == "lm_eval") != (self.task is not None):
            raise ValueError("kind lm_eval needs task (an lm-eval task name, or a folder/YAML file of task "
                             "definitions); other kinds take no task")
        if self.task is not None and (self.path is not None or self.domain is not None):
            raise ValueError("kind lm_eval reads its data through the task; give neither path nor domain")
        if self.task is None and (self.path is None) == (self.domain is None):
            raise ValueError("set exactly one of path or domain")
        if self.domain is not None and self.kind != "perplexity":
            raise ValueError("domain is only for perplexity benchmarks; give a path")
        metrics = BENCHMARK_KINDS.meta(self.kind)["metrics"]
        if self.metric is not None and self.metric not in metrics:
            raise ValueError(f"metric {self.metric!r} is not one of {', '.join(metrics)} for kind {self.kind}")
        for fields, kind in ((("blank_template",), "multiple_choice"), (("trust_task_code",), "lm_eval"),
                             (("instruction", "shots", "stop", "max_new_tokens"), "generation"),
                             (("question_template",), ("multiple_choice", "generation"))):
            stray = [f for f in fields if self.kind not in kind and getattr(self, f) != type(self).model_fields[f].default]
            if stray:
                raise ValueError(f"{', '.join(stray)} is not used by kind {self.kind}")
        if self.question_template is not None and "{question}" not in self.question_template:
            raise ValueError("question_template must contain {question}")
        if "___" not in self.blank_template and "{blank}" not in self.blank_template:
            raise ValueError("blank_template must contain ___ or {blank} where each option goes")
        if self.ceiling is not None and self.objective_metric in CHANCE_METRICS and not 0 < self.ceiling <= 1:
            raise ValueError(f"ceiling of {self.objective_metric} must lie in (0, 1], got {self.ceiling}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.path and not self.allow_test_split and (part := looks_like_test_split(self.path)):
            raise ValueError(
                f"path {self.path} looks like a test split ({part!r}): choosing a mixture by its test score "
                "leaks the test set into the choice. Point at a validation split, or set allow_test_split: true"
            )
        return self

    @property
    def objective_metric(self) -> str:
        return self.metric or BENCHMARK_KINDS.meta(self.kind)["metrics"][0]


def looks_like_test_split(path: str) -> str | None:
    """The part of `path` that marks it as a test split, or None. A directory named `test` or ending in
    `_test`/`-test`, or a file whose stem (before the first dot) is `test`, ends in `_test`/`-test` or starts
    with `test-`/`test_` (Hugging Face shards: `test-00000-of-00001.parquet`). `builtin:` corpora never are."""
    if path.startswith("builtin:"):
        return None
    *dirs, file = Path(path).parts or ("",)
    stem = file.split(".")[0].lower()
    for d in dirs:
        low = d.lower()
        if low == "test" or low.endswith(("_test", "-test")):
            return d
    if stem == "test" or stem.endswith(("_test", "-test")) or stem.startswith(("test-", "test_")):
        return file
    return None


class EvalSpec(_Model):
    """The benchmarks every merge is scored on, and the objective made of them."""

    batch_size: int = Field(32, gt=0, description="sequences per forward pass when scoring")
    benchmarks: list[BenchmarkSpec] = Field(..., min_length=1, description="benchmarks scored for every merge")
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="objective weight per capability group (missing groups weigh 1); the objective is the "
        "weighted mean of the groups' normalized scores",
    )
    low_signal: Literal["drop", "downweight", "keep"] = Field(
        "drop",
        description="a benchmark whose spread over base and experts lies within its item noise "
        "(below low_signal_ratio standard errors) cannot rank merges: drop it, downweight it or keep it",
    )
    low_signal_ratio: float = Field(
        1.0, ge=0, description="spread / stderr below which a benchmark is low-signal (0 never flags one)"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="scoring: bf16/fp16 autocast every forward pass (bf16 on CPUs too, fp16 CUDA only); "
        "auto: bf16 on a CUDA GPU that has it, else fp32 (docs/fidelity.md, Scoring speed)"
    )

    @model_validator(mode="after")
    def _check(self) -> EvalSpec:
        names = [b.name for b in self.benchmarks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"benchmark names must be unique, {', '.join(dup)} repeated")
        groups = {b.capability for b in self.benchmarks}
        for g, w in self.weights.items():
            if g not in groups:
                close = difflib.get_close_matches(g, sorted(groups), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"weight for unknown capability {g!r} (groups: {', '.join(sorted(groups))}){hint}")
            if w < 0:
                raise ValueError(f"weight of {g!r} must be >= 0, got {w}")
        if sum(self.weights.get(g, 1.0) for g in groups) <= 0:
            raise ValueError("at least one capability needs a positive weight")
        return self

    def weight(self, group: str) -> float:
        return self.weights.get(group, 1.0)


class MergeSpec(_Model):
    """How experts are merged for each trial; the methods mean what mergekit's of the same name mean
    (`mergemix ls` lists them)."""

    method: str = Field("linear", description="merge method: linear (= task_arithmetic), ties, dare_linear, "
                        "dare_ties")
    density: float = Field(0.5, gt=0, le=1, description="ties and dare: share of each task vector kept, per "
                           "tensor (ties: the largest magnitudes; dare: a seeded random draw)")
    rescale: bool | None = Field(None, description="ties and dare: scale the kept entries so each tensor keeps "
                                 "its L1 norm (default: on for dare, off for ties)")
    normalize: bool | None = Field(None, description="divide the merged task vector by the weight that took part "
                                   "(per entry for ties; default: on for ties, off otherwise)")
    sign: Literal["sum", "count"] = Field("sum", description="ties and dare_ties: the elected sign of an entry is "
                                          "that of the weighted sum (TIES paper) or of most experts")
    scale: float = Field(1.0, description="lambda: the merged task vector is multiplied by it")
    task_vectors: Literal["model", "float32"] = Field(
        "model", description="dtype task vectors are kept in: the model's (half the memory for bfloat16 models) "
        "or float32; sums accumulate in float32 either way")
    stream: bool = Field(False, description="read the experts' memory-mapped safetensors files for every merge "
                         "instead of keeping task vectors in memory: slower, memory no longer grows with K; "
                         "the same result")
    memory_mb: float = Field(512, gt=0, description="working memory of one merge step in MiB: parameters are merged "
                           "in groups of about this size")

    def key(self) -> Any:
        """What merged weights depend on: the method name alone when every other result-changing field has its
        default (so earlier runs' trial logs still count)."""
        changed = self.model_dump(mode="json", exclude={"method", "stream", "memory_mb"}, exclude_defaults=True)
        return [self.method, changed] if changed else self.method

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        return MERGE_METHODS.check(v)


class SearchSpec(_Model):
    """Performance surface mapping: seeds, surrogates, dense search on the simplex, verification."""

    seeds: int = Field(40, ge=1, description="seed mixtures evaluated by real merging (vertices, uniform, "
                       "token-proportional, then Dirichlet draws around the token prior)")
    concentration: float = Field(
        2.0,
        gt=0,
        description="seed draws are Dirichlet(concentration x K x prior): mean = the token prior; higher = closer "
        "to it (2.0 spreads well over the simplex for K = 4)",
    )
    strategy: str = Field(
        "auto", description="auto (gradient where it can run, else surface) | surface | tpe | cmaes | gp | "
        "gradient | grid; `mergemix ls` describes each, docs/guide.md, Search strategies says when")
    trials: int | None = Field(
        None, ge=1, description="mixtures a strategy may score after the references (base, vertices, uniform, token "
        "prior), seeds included; default: the seeds plus `verify` (surface's own count)"
    )
    timeout_s: float | None = Field(None, gt=0, description="stop asking for new mixtures after this many seconds")
    storage: str | None = Field(
        None, description="optuna strategies: RDB URL of the shared study (e.g. postgresql://user@host/db); default "
        "sqlite in the run directory. Workers (mergemix search RECIPE --worker) add trials to the same study"
    )
    surrogate: str = Field("lightgbm", description="surrogate per capability group: lightgbm | quadratic")
    surrogate_prior: Literal["none", "residual", "feature"] = Field(
        "none", description="what the surrogate starts from: none (alpha only) | residual (what "
        "the experts' interpolation leaves) | feature (priors as inputs); docs/guide.md, Surrogate priors")
    candidates: int = Field(20000, ge=10, description="simplex points scored on the surrogate")
    verify: int = Field(5, ge=0, description="top surrogate candidates verified by real merge + evaluation")
    verify_real: int = Field(
        0, ge=0, description="after the search, train the top N mixtures and uniform and token-proportional for a "
        "short real run (report.steps or report.tokens, one seed) and propose the best; its cost is in "
        "proposal.json. 0 = off"
    )
    final: Literal["best", "top_k_mean"] = Field(
        "best", description="alpha*: the best really evaluated point, or the mean of the top `top_k` of them"
    )
    top_k: int = Field(3, ge=1, description="points averaged when final = top_k_mean")
    repetition: Literal["ignore", "discount"] = Field(
        "ignore", description="discount: score each mixture by the merge at shares discounted for the data it repeats "
        "(Muennighoff et al. 2023); ignore: as the merge sees it. Measured, no gain on either testbed: docs/fidelity.md"
    )
    repetition_r_star: float = Field(
        15.4, gt=0, description="repetition discount: repetitions after which a repeated token's value has decayed "
        "by 1/e (R*, Muennighoff et al. 2023's fit)"
    )
    kl_weight: float = Field(
        0.0, ge=0, description="alpha* maximizes objective - kl_weight x KL(alpha || token-proportional mix) (nats): "
        "a pull toward the natural mix where the objective barely tells mixtures apart; 0 = none"
    )
    gradient_steps: int = Field(
        30, ge=1, description="strategy gradient: Adam steps on the logits of alpha (each one forward + backward "
        "of the merged model on gradient_batch items per benchmark)"
    )
    gradient_lr: float = Field(
        0.1, gt=0, le=10, description="strategy gradient: Adam learning rate on the logits (0.1 moves a share by "
        "about 10% of itself per step)"
    )
    gradient_batch: int = Field(
        16, ge=0, description="strategy gradient: items (perplexity blocks, multiple-choice items) drawn per "
        "benchmark and step for the stochastic gradient; 0 = all of them every step"
    )
    gradient_verify: int = Field(
        4, ge=1, description="strategy gradient: points along the descent verified by real merge + evaluation, "
        "evenly spaced, the last one its end point (its start point is verified too)"
    )
    launch: Literal["auto", "sharded", "data_parallel"] = Field(
        "auto", description="the search under a multi-process launch: sharded (FSDP2: each process holds 1/N of "
        "base and task vectors) or data_parallel (each holds all); auto: data_parallel if it fits"
    )
    gradient_start: Literal["prior", "uniform", "best"] = Field(
        "prior", description="strategy gradient: start point: the token-proportional mix, uniform (both moved "
        "into the bounds), or the best-scoring feasible reference (vertices, uniform, token prior)"
    )

    @field_validator("surrogate")
    @classmethod
    def _known(cls, v: str) -> str:
        return SURROGATES.check(v)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        return v if v == "auto" else STRATEGIES.check(v)


class ReuseSpec(_Model):
    """Shares taken over from an earlier run's proposal.json, so that only the other domains are searched (a
    domain added to a mixture already tuned)."""

    proposal: str = Field(..., description="the earlier run's proposal.json (its alpha_star is read)")
    domains: list[str] | None = Field(
        None, description="domains whose earlier share is reused; default: every domain of this recipe that the "
        "earlier proposal has (the others, e.g. a new domain, are searched)"
    )
    keep: Literal["ratios", "shares"] = Field(
        "ratios", description="ratios: the reused domains keep their earlier ratios and only their total "
        "is searched; shares: each is pinned at its earlier share")
    _alpha: dict[str, float] = PrivateAttr(default_factory=dict)  # the earlier alpha*, read at validation

    @model_validator(mode="after")
    def _read(self) -> ReuseSpec:
        path = Path(self.proposal)
        if not path.is_file():
            raise ValueError(f"proposal {self.proposal}: file not found; give the proposal.json of an earlier run")
        try:
            alpha = json.loads(path.read_text(encoding="utf-8")).get("alpha_star")
        except (ValueError, UnicodeDecodeError, AttributeError):
            alpha = None
        if not isinstance(alpha, dict) or not alpha or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in alpha.values()):
            raise ValueError(f"proposal {self.proposal}: not a mergemix proposal.json (no alpha_star of domain "
                             "shares); give the proposal.json of an earlier run")
        self._alpha = {str(d): float(v) for d, v in alpha.items()}
        return self

    def shares(self, domains: list[str]) -> dict[str, float]:
        """The earlier share of each reused domain among `domains` (the recipe's), in recipe order."""
        chosen = self.domains if self.domains is not None else [d for d in domains if d in self._alpha]
        return {d: self._alpha[d] for d in domains if d in chosen}

    def check(self, domains: list[str]) -> str | None:
        """Why these shares cannot be reused by a recipe of `domains`, or None."""
        for d in self.domains or []:
            if d not in domains:
                return f"domains: {d} is not a domain of this recipe (domains: {', '.join(domains)})"
            if d not in self._alpha:
                return f"domains: {d} has no share in {self.proposal} (its domains: {', '.join(self._alpha)})"
        reused = self.shares(domains)
        if not reused:
            return f"{self.proposal} has none of this recipe's domains (its domains: {', '.join(self._alpha)})"
        if len(reused) == len(domains):
            return ("every domain's share is reused, so nothing is left to search; add a domain or list fewer in "
                    "mixture.reuse.domains")
        if self.keep == "ratios" and sum(reused.values()) <= 0:
            return f"the reused domains have no share in {self.proposal}, so they have no ratios to keep"
        return None


REUSED = "reused"  # the group of the reused domains when mixture.reuse keeps their ratios


class MixtureSpec(_Model):
    """How alpha* becomes a mid-training mixture."""

    total_tokens: int = Field(1_000_000_000, gt=0, description="mid-training token budget to divide")
    max_epochs: float | None = Field(
        None, gt=0, description="repetition cap per domain: at most max_epochs x its available tokens, i.e. a share "
        "of at most max_epochs x available / total_tokens, a bound the search keeps (checked once the data is read)"
    )
    min_share: dict[str, float] = Field(
        default_factory=dict, description="domain -> lowest share; the search stays above it. A 1% floor kept "
        "runs that dropped a domain from collapsing (docs/fidelity.md, Leaving a domain out)")
    max_share: dict[str, float] = Field(
        default_factory=dict, description="domain -> highest share of the mixture; the search stays below it"
    )
    pinned: dict[str, float] = Field(
        default_factory=dict, description="domain -> fixed share (e.g. from an earlier proposal); only the other "
        "domains' shares are searched"
    )
    groups: dict[str, list[str]] = Field(
        default_factory=dict, description="group -> its domains, searched top-down: the groups' shares first, then "
        "the shares within each group (docs/guide.md, Hierarchical domains)")
    reuse: ReuseSpec | None = Field(
        None, description="take shares from an earlier run's proposal.json and search only the other domains"
    )

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        seen: dict[str, str] = {}
        for g, members in v.items():
            if not re.match(NAME, g):
                raise ValueError(f"group name {g!r}: use letters, digits, _ -")
            if not members:
                raise ValueError(f"group {g} has no domains")
            for d in members:
                if d in seen:
                    where = "twice" if seen[d] == g else f"in groups {seen[d]} and {g}"
                    raise ValueError(f"domain {d} is listed {where}; a domain belongs to at most one group")
                seen[d] = g
        return v

    @field_validator("min_share", "max_share", "pinned")
    @classmethod
    def _shares(cls, v: dict[str, float]) -> dict[str, float]:
        for d, share in v.items():
            if not 0 <= share <= 1:
                raise ValueError(f"share of {d!r} must lie in [0, 1], got {share}")
        return v

    def bounds(self, domains: list[str], available: dict[str, int] | None = None) -> Bounds:
        """The feasible set; with `available` (tokens per domain) the
        repetition cap is one of its bounds."""
        cap = None
        if self.max_epochs is not None and available is not None:
            cap = {d: self.max_epochs * available[d] / self.total_tokens for d in domains}
        return Bounds.build(domains, self.min_share, self.max_share, {**self.pinned, **self.reused_pins(domains)},
                            cap)

    def reused_pins(self, domains: list[str]) -> dict[str, float]:
        """Domain -> share pinned by mixture.reuse with keep: shares (empty otherwise)."""
        if self.reuse is None or self.reuse.keep != "shares":
            return {}
        return self.reuse.shares(domains)

    def units(self, domains: list[str]) -> dict[str, list[str]]:
        """The top level of a hierarchical search: group -> its domains (recipe order), the reused domains as
        one group when mixture.reuse keeps their ratios, every other domain a group of its own. Only the
        domains themselves when nothing is grouped."""
        grouped = {d: g for g, members in self.groups.items() for d in members}
        if self.reuse is not None and self.reuse.keep == "ratios":
            grouped.update({d: REUSED for d in self.reuse.shares(domains)})
        out: dict[str, list[str]] = {}
        for d in domains:
            out.setdefault(grouped.get(d, d), []).append(d)
        return out


class ReportSpec(_Model):
    """Rank consistency: real models trained on a few mixtures, ranked by the merged proxy and by the truth."""

    mixtures: int = Field(
        12, ge=4, description="mixtures trained for real: the proposal, uniform, token-proportional, the `include` "
        "list, then points spread over `space` (greedy max-min distance among Dirichlet(1) draws)"
    )
    space: Literal["feasible", "simplex"] = Field(
        "feasible", description="where the spread points and `include` lie: within the mixture bounds (max_epochs "
        "at the runs' token budget), the mixtures a run of this recipe could propose; or the whole simplex"
    )
    include: list[dict[str, float]] = Field(
        default_factory=list, description="mixtures of your own to train (domain -> weight, normalized to sum 1)"
    )
    seeds: int = Field(
        2, ge=1, le=5, description="trainings per mixture with different seeds; with 2 or more, the rank agreement "
        "between seeds is the noise ceiling: how well one real training ranks another's results"
    )
    steps: int | None = Field(None, gt=0, description="optimizer steps per mixture run (default 2 x the experts')")
    tokens: int | None = Field(None, gt=0, description="token budget per mixture run (alternative to steps)")
    lr: float | None = Field(
        None, gt=0, description="constant learning rate of the mixture runs after warmup (default: experts.lr); "
        "set it to your mid-training's, to try an experts.lr of their own against the same real runs"
    )
    warmup_steps: int | None = Field(
        None, ge=0, description="linear warmup steps of the mixture runs (default: experts.warmup_steps)"
    )
    bootstrap: int = Field(1000, ge=100, description="bootstrap resamples for the 95% intervals of rho and tau")
    interference_batches: int = Field(
        2, ge=0, description="batches (of experts.batch_size blocks) per domain for the Hessian-vector-product "
        "interference estimate; 0 skips it"
    )

    @model_validator(mode="after")
    def _budget(self) -> ReportSpec:
        if self.steps is not None and self.tokens is not None:
            raise ValueError("set report.steps or report.tokens, not both")
        for i, mix in enumerate(self.include):
            if not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
                raise ValueError(f"include[{i}]: weights must be >= 0 with a positive sum, got {mix}")
        return self

    def num_steps(self, experts: ExpertSpec, seq_len: int) -> int:
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return math.ceil(self.tokens / experts.tokens_per_step(seq_len))
        return 2 * experts.num_steps(seq_len)

    def run_tokens(self, experts: ExpertSpec, seq_len: int) -> int:
        """Tokens one mixture run trains on: the budget its repetition caps apply at."""
        return self.num_steps(experts, seq_len) * experts.tokens_per_step(seq_len)

    def schedule(self, experts: ExpertSpec) -> tuple[float, int]:
        """The mixture runs' (learning rate, warmup steps): the report's own, else the experts'."""
        return (experts.lr if self.lr is None else self.lr,
                experts.warmup_steps if self.warmup_steps is None else self.warmup_steps)


class Recipe(_Model):
    """A mergemix run: base, domains, experts, benchmarks, search, mixture."""

    name: str = Field(..., pattern=NAME, description="run name; the run lives in runs/NAME")
    seed: int = Field(0, description="seed of every random choice (splits, sampling, init, search)")
    run_dir: str | None = Field(None, description="run directory (default runs/NAME)")
    cache_dir: str | None = Field(
        None, description="cache for tokenized data and built bases (default $MERGEMIX_CACHE or ~/.cache/mergemix)"
    )
    device: Literal["auto", "cpu"] = Field(
        "auto", description="auto: the GPU when one is present (several under accelerate launch or torchrun: "
        "data-parallel experts); cpu: train on CPU even where there is one"
    )
    threads: int | None = Field(None, gt=0, description="CPU threads for torch (default: torch's choice)")
    base: BaseSpec = Field(default_factory=BaseSpec, description="the shared base checkpoint")
    data: DataSpec = Field(..., description="the domains: one expert each, one share each in the proposal")
    experts: ExpertSpec = Field(..., description="how each domain's expert is trained from the base")
    merge: MergeSpec = Field(default_factory=MergeSpec, description="how experts are merged")
    evaluation: EvalSpec = Field(..., description="the benchmarks every merge is scored on, and the objective")
    search: SearchSpec = Field(default_factory=SearchSpec, description="how alpha is searched")
    mixture: MixtureSpec = Field(default_factory=MixtureSpec, description="alpha* to tokens and epochs")
    report: ReportSpec = Field(default_factory=ReportSpec, description="rank-consistency report (mergemix report)")

    @model_validator(mode="before")
    @classmethod
    def _split_default(cls, raw: Any) -> Any:
        """With a checkpoint given nothing is pre-trained here, so no data is set aside for it by default."""
        if isinstance(raw, dict) and isinstance(raw.get("base"), dict) and raw["base"].get("path"):
            data = raw.get("data")
            if isinstance(data, dict):
                split = data.get("split") or {}
                if isinstance(split, dict) and "base" not in split:
                    raw = {**raw, "data": {**data, "split": {**split, "base": 0.0}}}
        return raw

    @model_validator(mode="after")
    def _cross(self) -> Recipe:
        if not self.base.path and self.data.split.base == 0:
            raise ValueError("data.split.base is 0, but the demo base (no base.path) is pre-trained on that share; "
                             "give base.path or a base share > 0")
        names = {d.name for d in self.data.domains}
        if self.search.seeds < len(names) + 2:
            raise ValueError(
                f"search.seeds must be at least {len(names) + 2} (the {len(names)} vertices, uniform and the "
                f"token prior), got {self.search.seeds}"
            )
        self._check_groups(names)
        for b in self.evaluation.benchmarks:
            if b.domain is not None and b.domain not in names:
                raise ValueError(f"benchmark {b.name!r} scores unknown domain {b.domain!r}")
        for i, mix in enumerate(self.report.include):
            unknown = sorted(set(mix) - names)
            if unknown:
                raise ValueError(f"report.include[{i}]: unknown domain {', '.join(unknown)} (domains: "
                                 f"{', '.join(sorted(names))})")
        for where, given in (("experts.checkpoints", self.experts.checkpoints),
                             ("experts.replay_proportions", self.experts.replay_proportions or {})):
            unknown = sorted(set(given) - names)
            if unknown:
                raise ValueError(f"{where}: unknown domain {', '.join(unknown)} (domains: {', '.join(sorted(names))})")
        if self.experts.replay_proportions is not None and set(self.experts.replay_proportions) != names:
            missing = sorted(names - set(self.experts.replay_proportions))
            raise ValueError(f"experts.replay_proportions: give every domain's proportion ({', '.join(missing)} "
                             "missing)")
        for field_name in ("min_share", "max_share", "pinned"):
            unknown = sorted(set(getattr(self.mixture, field_name)) - names)
            if unknown:
                raise ValueError(f"mixture.{field_name}: unknown domain {', '.join(unknown)} (domains: "
                                 f"{', '.join(sorted(names))})")
        m = self.mixture
        pins = [("mixture.pinned", d, pin) for d, pin in m.pinned.items()]
        pins += [("mixture.reuse", d, pin) for d, pin in m.reused_pins(self.domain_names).items()]
        for where, d, pin in pins:
            if pin > m.max_share.get(d, 1.0) or pin < m.min_share.get(d, 0.0):
                side = "above its max_share" if pin > m.max_share.get(d, 1.0) else "below its min_share"
                raise ValueError(f"{where}: {d} pinned at {pin:g} is {side}; change one of them")
        given = {d.name: d.available_tokens for d in self.data.domains if d.available_tokens}
        # With every domain's available_tokens given, the repetition cap is checked here too.
        problem = self.mixture.bounds(self.domain_names, given if len(given) == len(names) else None).problem()
        if problem:
            raise ValueError(f"mixture: {problem}")
        if len(self.report.include) + 3 > self.report.mixtures:
            raise ValueError(f"report.mixtures ({self.report.mixtures}) must leave room for the proposal, uniform, "
                             f"token-proportional and the {len(self.report.include)} included mixtures")
        return self

    def _check_groups(self, names: set[str]) -> None:
        """mixture.groups and mixture.reuse name this recipe's domains and leave something to search; grid
        searches at most 3 unpinned domains or groups per stage."""
        m = self.mixture
        known = f"(domains: {', '.join(self.domain_names)})"
        for g, members in m.groups.items():
            unknown = [d for d in members if d not in names]
            if unknown:
                raise ValueError(f"mixture.groups.{g}: unknown domain {', '.join(unknown)} {known}")
            if g in names:
                raise ValueError(f"mixture.groups: group {g} has the name of a domain; rename the group")
        if m.reuse is not None:
            problem = m.reuse.check(self.domain_names)
            if problem:
                raise ValueError(f"mixture.reuse: {problem}")
            reused = m.reuse.shares(self.domain_names)
            clash = [d for d in reused if d in m.pinned]
            if clash:
                raise ValueError(f"mixture.reuse: {clash[0]} is also in mixture.pinned; its share comes from one of "
                                 "them only")
            grouped = [d for d in reused if any(d in ms for ms in m.groups.values())]
            if m.reuse.keep == "ratios" and grouped:
                raise ValueError(f"mixture.reuse: {grouped[0]} is also in mixture.groups; with keep: ratios the "
                                 f"reused domains form the group {REUSED!r} of their own")
            if m.reuse.keep == "ratios" and REUSED in names | set(m.groups):
                raise ValueError(f"mixture.reuse: {REUSED!r} names the group of the reused domains; rename the "
                                 f"domain or group called {REUSED}")
        if self.search.strategy == "gradient" and len(m.units(self.domain_names)) < len(names):
            raise ValueError("search.strategy gradient searches flat shares: it does not take mixture.groups or "
                             "mixture.reuse with keep: ratios; choose another strategy or drop the grouping")
        if self.search.strategy == "grid":
            pinned = set(m.pinned) | set(m.reused_pins(self.domain_names))
            units = m.units(self.domain_names)
            stages = [[u for u, ds in units.items() if set(ds) - pinned]]
            stages += [[d for d in ds if d not in pinned] for u, ds in units.items() if u in m.groups]
            widest = max(len(s) for s in stages)
            if widest > 3:
                raise ValueError(f"search.strategy grid is for at most 3 unpinned domains (its points grow as "
                                 f"n^(K-1)), or with mixture.groups 3 groups and 3 domains per group, got {widest}; "
                                 "choose surface, tpe, cmaes or gp")

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.data.domains]

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or Path("runs") / self.name)

    def resolved_cache_dir(self) -> Path:
        import os

        return Path(self.cache_dir or os.environ.get("MERGEMIX_CACHE") or Path.home() / ".cache" / "mergemix")


# ---------------------------------------------------------------------------------------------- loading


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the last key of `loc` (for 'did you mean' on unknown keys)."""
    model: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        for arg in (ann, *typing.get_args(ann)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                model = arg
                break
        else:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _format_error(err: dict[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if p not in ("function-after",))
    where = _format_loc(loc)
    if err["type"] == "extra_forbidden":
        model = _model_at(loc)
        known = sorted(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}" if known else ""
        return f"{where}: unknown key{hint}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if err["type"] in bounds:
        (limit,) = err["ctx"].values()
        return f"{where}: must be {bounds[err['type']]} {limit:g}, got {err['input']!r}"
    msg = err["msg"]
    msg = msg.removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{where}: required field is missing"
    if "input" in err and err["type"] not in ("value_error", "assertion_error"):
        value = err["input"]
        shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
        return f"{where}: {msg[0].lower() + msg[1:]}, got {shown}"
    return f"{where}: {msg}"


def _set_dotted(raw: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = _list_index(node, part, f"{source}: {'.'.join(parts[: i + 1])}")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise MergemixError(f"{source}: cannot set {key!r}: {'.'.join(parts[:i])} is not a mapping or list")


def _list_index(node: list[Any], part: str, where: str) -> int:
    """A list element by position or by its `name`, so `data.domains.code.max_chars=1000000` works."""
    if part.lstrip("-").isdigit():
        idx = int(part)
        if not -len(node) <= idx < len(node):
            raise MergemixError(f"{where}: index {idx} out of range (list has {len(node)} items)")
        return idx
    names = [x.get("name") if isinstance(x, dict) else None for x in node]
    if part in names:
        return names.index(part)
    raise MergemixError(f"{where}: no item named {part!r} (names: {', '.join(str(n) for n in names)})")


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """`key.sub=value` strings to (key, YAML-parsed value) pairs."""
    pairs = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MergemixError(f"override {item!r}: expected dotted.key=value, e.g. experts.steps=50")
        try:
            pairs.append((key.strip(), yaml.safe_load(value)))
        except yaml.YAMLError as e:
            raise MergemixError(f"override {item!r}: value is not valid YAML ({e})") from None
    return pairs


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises MergemixError naming the file and field on bad input."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.y*ml"))
        hint = f" ({', '.join(inside[:5])})" if inside else ""
        raise MergemixError(f"{path}: is a directory, not a recipe; give the recipe's YAML file{hint}")
    if not path.is_file():
        raise MergemixError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise MergemixError(f"{path}: {where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise MergemixError(f"{path}: expected a mapping of recipe fields at the top level")
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value, str(path))
    return recipe_from_dict(raw, source=str(path))


def recipe_from_dict(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        lines = [f"{source}: {_format_error(err)}" for err in e.errors()]
        raise MergemixError("\n".join(lines)) from None
    except MergemixError as e:
        raise MergemixError(f"{source}: {e}") from None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every default spelled out)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
