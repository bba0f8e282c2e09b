from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mergemix.errors import MergemixError
from mergemix.evaluate import EvalContext, Objective
from mergemix.evaluate.generation import Generation, greedy_generate
from mergemix.evaluate.kinds import (
    MultipleChoice,
    Perplexity,
    Request,
    _score_shared,
    _score_whole,
    score_requests,
    token_nll,
)
from mergemix.recipe import BenchmarkSpec, EvalSpec


def _ctx(tok: Any, tmp_path: Path, heldout: dict | None = None, batch_size: int = 3) -> EvalContext:
    return EvalContext(tok, 16, heldout or {}, tmp_path, batch_size, 0)


def _mc_file(tmp_path: Path, lines: list[Any]) -> Path:
    p = tmp_path / "mc.jsonl"
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return p


def _direct_logprob(model: torch.nn.Module, tok: Any, context: str, option: str) -> tuple[float, int]:
    """One sequence at a time: the option is what `context + " " + option` has beyond the context's tokens."""
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    whole = tok(f"{context} {option}", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0], -1)
    return sum(lp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))), len(whole) - n_ctx


def test_multiple_choice_matches_unbatched_scoring(tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = tiny_lm
    items = [
        {"question": "the quick brown", "choices": ["fox", "dog jumps", "0"], "answer": 0},
        {"question": "1 + 2 =", "choices": ["3", "4 4 4 4", "5", "lazy"], "answer": 2},
        {"question": "over the", "choices": ["lazy dog", "quick"], "answer": 1},
    ]
    spec = BenchmarkSpec(name="mc", kind="multiple_choice", path=str(_mc_file(tmp_path, items)))
    bench = MultipleChoice(spec, _ctx(tok, tmp_path, batch_size=2), MultipleChoice.read(spec, tmp_path))
    result = bench.score(model)
    acc, acc_norm, margin = [], [], []
    for it in items:
        scored = [_direct_logprob(model, tok, it["question"], c) for c in it["choices"]]
        total = [s for s, _ in scored]
        acc.append(float(total.index(max(total)) == it["answer"]))
        per_char = [s / len(c) for s, c in zip(total, it["choices"], strict=True)]
        acc_norm.append(float(per_char.index(max(per_char)) == it["answer"]))
        per_tok = [s / n for s, n in scored]
        wrong = [v for k, v in enumerate(per_tok) if k != it["answer"]]
        margin.append(per_tok[it["answer"]] - sum(wrong) / len(wrong))
    assert result["acc"] == pytest.approx(sum(acc) / 3)
    assert result["acc_norm"] == pytest.approx(sum(acc_norm) / 3)
    assert result["score"] == pytest.approx(sum(margin) / 3, abs=1e-4)
    assert result["chance"] == pytest.approx((1 / 3 + 1 / 4 + 1 / 2) / 3)
    items = bench.item_values(model)  # what the paired guard compares: one value per item, in item order
    assert items["acc"].tolist() == acc
    assert items["score"].tolist() == pytest.approx(margin, abs=1e-4)


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ('{"question": "q", "choices": ["a", "b"]}', r"mc.jsonl:2: missing field answer"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 2}', r"mc.jsonl:2: answer must be an index .*got 2"),
        ('{"question": "q", "choices": ["a"], "answer": 0}', r"mc.jsonl:2: choices must be a list of two or more"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 0', r"mc.jsonl:2: not valid JSON"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 0, "blank": "no marker"}',
         r"mc.jsonl:2: blank must be text with a ___ or \{blank\} marker"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 0, "blank": 3}', r"mc.jsonl:2: blank must be text"),
        ('{"choices": ["a", "b"], "answer": 0}', r"mc.jsonl:2: missing field question"),
        ('["q", ["a", "b"], 0]', r"mc.jsonl:2: expected an object"),
    ],
)
def test_malformed_multiple_choice_names_line(tmp_path: Path, line: str, pattern: str) -> None:
    good = {"question": "q", "choices": ["a", "b"], "answer": 0}
    spec = BenchmarkSpec(name="mc", kind="multiple_choice", path=str(_mc_file(tmp_path, [good, line])))
    with pytest.raises(MergemixError, match=pattern):
        MultipleChoice.read(spec, tmp_path)


def test_perplexity_is_mean_token_loss(tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = tiny_lm
    blocks = torch.randint(0, len(tok), (5, 16))
    spec = BenchmarkSpec(name="p", kind="perplexity", domain="d")
    result = Perplexity(spec, _ctx(tok, tmp_path, {"d": blocks}), None).score(model)
    with torch.no_grad():
        expected = model(input_ids=blocks, labels=blocks).loss.item()
    assert result["loss"] == pytest.approx(expected, rel=1e-4)
    assert result["loss_se"] > 0 and result["n"] == 5
    with torch.no_grad():
        per_block = [model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks]
    bench = Perplexity(spec, _ctx(tok, tmp_path, {"d": blocks}), None)
    assert bench.item_values(model)["loss"].tolist() == pytest.approx(per_block, rel=1e-4)


def test_token_nll_in_chunks_equals_one_float32_pass() -> None:
    """Perplexity scores a chunk of positions at a time (no float32 copy of a whole batch's logits); the
    chunk size, even one that does not divide the positions, changes nothing but rounding."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=gen).to(torch.bfloat16)
    targets = torch.randint(0, 11, (3, 7), generator=gen)
    whole = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 11), targets.reshape(-1),
                                              reduction="none").view(3, 7)
    for chunk in (1, 4, 5, 21, 100):
        torch.testing.assert_close(token_nll(logits, targets, chunk=chunk), whole, rtol=0, atol=1e-6)


def test_objective_normalizes_by_the_spread_of_base_and_experts() -> None:
    spec = EvalSpec(
        benchmarks=[
            BenchmarkSpec(name="ppl", kind="perplexity", domain="d", capability="a"),
            BenchmarkSpec(name="mc", kind="multiple_choice", path="x", metric="acc", capability="b"),
        ],
        weights={"a": 3.0, "b": 1.0},
    )
    base = {"ppl": {"loss": 4.0}, "mc": {"acc": 0.3, "chance": 0.25}}
    experts = [{"ppl": {"loss": 3.0}, "mc": {"acc": 0.5, "chance": 0.25}},
               {"ppl": {"loss": 4.5}, "mc": {"acc": 0.25, "chance": 0.25}}]
    obj = Objective.from_references(spec, base, experts)
    norm, caps, value = obj(base)
    assert norm["ppl"] == pytest.approx(0.0) and norm["mc"] == pytest.approx((0.3 - 0.25) / 0.75)
    norm, caps, value = obj(experts[0])
    assert norm["ppl"] == pytest.approx(1.0 / 1.5)  # loss 1.0 below the base; spread 4.5 - 3.0
    assert caps == {"a": pytest.approx(1 / 1.5), "b": pytest.approx(1 / 3)}
    assert value == pytest.approx((3 / 1.5 + 1 / 3) / 4)


def test_objective_keeps_its_sign_when_every_expert_is_worse_than_the_base() -> None:
    spec = EvalSpec(benchmarks=[BenchmarkSpec(name="ppl", kind="perplexity", domain="d")])
    base = {"ppl": {"loss": 4.0}}
    obj = Objective.from_references(spec, base, [{"ppl": {"loss": 4.2}}, {"ppl": {"loss": 5.0}}])
    assert obj({"ppl": {"loss": 3.9}})[2] == pytest.approx(0.1)  # better than the base: positive
    assert obj({"ppl": {"loss": 5.0}})[2] == pytest.approx(-1.0)


class CharTokenizer:
    """One token per character (its code point); 0 is end of text."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i)


class Bigram(torch.nn.Module):
    """A model whose next-token logits depend on the current token only: table[current] (128 x 128)."""

    def __init__(self, pairs: dict[str, dict[str, float]]) -> None:
        super().__init__()
        table = torch.full((128, 128), -10.0)
        for cur, nxt in pairs.items():
            for tok, logit in nxt.items():
                table[ord(cur), ord(tok)] = logit
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        return type("Out", (), {"logits": self.table[input_ids], "past_key_values": None})()


def test_blank_ppl_uses_the_text_after_the_blank(tmp_path: Path) -> None:
    # After "x", "a" and "b" are equally likely; only "a" is followed well by "c". After a space (the
    # plain continuation of acc) the model prefers "b": acc must miss and blank_ppl must hit.
    model = Bigram({"x": {"a": 0.0, "b": 0.0, " ": 0.0}, "a": {"c": 5.0}, "b": {"c": -5.0}, " ": {"b": 3.0}})
    items = [{"question": "x", "choices": ["a", "b"], "answer": 0, "blank": "x___c"},
             {"question": "x", "choices": ["b", "a"], "answer": 1, "blank": "x{blank}c"}]
    spec = BenchmarkSpec(name="mc", kind="multiple_choice", path=str(_mc_file(tmp_path, items)))
    result = MultipleChoice(spec, _ctx(CharTokenizer(), tmp_path), MultipleChoice.read(spec, tmp_path)).score(model)
    assert result["blank_ppl"] == 1.0 and result["acc"] == 0.0
    assert result["margin"] == pytest.approx(result["score"])  # two options: the mean wrong is the best wrong


def test_blank_template_at_the_end_scores_the_option_per_token(tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
    """The default cloze text is the question with the blank at its end: one request per option, shared
    with acc's, and blank_ppl is the accuracy of the best mean log-prob per token."""
    model, tok = tiny_lm
    items = [{"question": "the quick", "choices": ["fox", "dog jumps", "0"], "answer": 1},
             {"question": "1 + 2 =", "choices": ["3", "4 4 4 4"], "answer": 0}]
    spec = BenchmarkSpec(name="mc", kind="multiple_choice", path=str(_mc_file(tmp_path, items)))
    bench = MultipleChoice(spec, _ctx(tok, tmp_path), MultipleChoice.read(spec, tmp_path))
    assert len(bench.requests) == 5
    expected = []
    for it in items:
        per_tok = [s / n for s, n in (_direct_logprob(model, tok, it["question"], c) for c in it["choices"])]
        expected.append(float(per_tok.index(max(per_tok)) == it["answer"]))
    assert bench.score(model)["blank_ppl"] == pytest.approx(sum(expected) / 2)


def _gen_file(tmp_path: Path, lines: list[Any], name: str = "gen.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return p


# After "Answer:" this model says " 42" and a newline, then "Q" forever.
FORTY_TWO = {":": {" ": 5.0}, " ": {"4": 5.0}, "4": {"2": 5.0}, "2": {"\n": 5.0}, "\n": {"Q": 5.0}, "Q": {"Q": 5.0}}


def _generation(tmp_path: Path, items: list[Any], **fields: Any) -> Generation:
    spec = BenchmarkSpec(name="gen", kind="generation", path=str(_gen_file(tmp_path, items)), **fields)
    return Generation(spec, _ctx(CharTokenizer(), tmp_path), Generation.read(spec, tmp_path))


def test_generation_exact_match_and_f1(tmp_path: Path) -> None:
    items = [{"question": f"q{i}", "answers": ["42", "forty-two"]} for i in range(3)]
    items += [{"question": "q3", "answer": "The 42."}, {"question": "q4", "answer": "43"},
              {"question": "q5", "answer": "42 apples"}]
    bench = _generation(tmp_path, items, shots=0)
    assert bench.answers(Bigram(FORTY_TWO)) == ["42"] * 6
    result = bench.score(Bigram(FORTY_TWO))
    assert result["exact_match"] == pytest.approx(4 / 6)  # "The 42." normalizes to "42"
    assert result["f1"] == pytest.approx((4 + 2 / 3) / 6)  # "42" vs "42 apples": precision 1, recall 1/2
    assert result["chance"] == 0.0


def test_generation_stops_at_stop_strings_and_max_new_tokens(tmp_path: Path) -> None:
    items = [{"question": f"q{i}", "answer": "4"} for i in range(3)]
    assert _generation(tmp_path, items, shots=0, stop=["2"]).answers(Bigram(FORTY_TWO)) == ["4"] * 3
    assert _generation(tmp_path, items, shots=0, stop=["x"], max_new_tokens=6).answers(Bigram(FORTY_TWO)) == [
        "42\nQQ"] * 3  # " 42\nQQ" is six tokens, stripped


def test_generation_shots_are_never_scored_items(tmp_path: Path) -> None:
    items = [{"question": f"question {i}?", "answer": f"a{i}"} for i in range(12)]
    bench = _generation(tmp_path, items, shots=3, max_items=5, instruction="Be brief.")
    header = CharTokenizer().decode(bench.prompts[0]).rpartition("Question: ")[0]
    assert header.startswith("Be brief.\n\n") and header.count("Question: ") == 3
    shot_questions = {s.question for s in bench.shots}
    assert len(shot_questions) == 3 and len(bench.items) == 5
    for it, prompt in zip(bench.items, bench.prompts, strict=True):
        assert it.question not in shot_questions
        text = CharTokenizer().decode(prompt)
        assert text.startswith(header) and text.endswith(f"Question: {it.question}\nAnswer:")
    for s in bench.shots:
        assert f"Question: {s.question}\nAnswer: {s.answers[0]}\n\n" in header


def test_greedy_generation_with_cache_matches_without(tiny_lm: tuple[Any, Any]) -> None:
    model, tok = tiny_lm

    class NoCache(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs: Any) -> Any:
            return self.inner(**{**kwargs, "use_cache": False})

    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("the quick brown", "1 + 2 = 3 and 4 + 5", "dog")]
    batched = greedy_generate(model, tok, prompts, 6, ["\n"])
    assert batched == greedy_generate(NoCache(model), tok, prompts, 6, ["\n"])
    assert batched == [greedy_generate(model, tok, [p], 6, ["\n"])[0] for p in prompts]  # padding changes nothing


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ('{"question": "q"}', r"gen.jsonl:2: missing field answer"),
        ('{"answer": "b"}', r"gen.jsonl:2: missing field question"),
        ('{"question": "q", "answer": ""}', r"gen.jsonl:2: empty answer"),
        ('{"question": "q", "answer": "The."}', r"gen.jsonl:2: empty answer"),
        ('{"question": "q", "answers": []}', r"gen.jsonl:2: answer must be text"),
        ('{"question": "q", "answer": 3}', r"gen.jsonl:2: answer must be text"),
        ('{"question": "", "answer": "b"}', r"gen.jsonl:2: question must be non-empty"),
    ],
)
def test_malformed_generation_names_line(tmp_path: Path, line: str, pattern: str) -> None:
    good = {"question": "q", "answer": "b"}
    spec = BenchmarkSpec(name="gen", kind="generation", path=str(_gen_file(tmp_path, [good, line, good])), shots=0)
    with pytest.raises(MergemixError, match=pattern):
        Generation.read(spec, tmp_path)


def test_generation_needs_items_beyond_its_shots(tmp_path: Path) -> None:
    spec = BenchmarkSpec(name="gen", kind="generation", shots=3,
                         path=str(_gen_file(tmp_path, [{"question": "q", "answer": "b"}] * 4)))
    with pytest.raises(MergemixError, match=r"gen.jsonl: 4 items; 3 are held out .* lower shots"):
        Generation.read(spec, tmp_path)


def test_objective_ceiling_maps_to_one_and_chance_to_zero() -> None:
    spec = EvalSpec(benchmarks=[
        BenchmarkSpec(name="mc", kind="multiple_choice", path="x", metric="blank_ppl", ceiling=0.75),
        BenchmarkSpec(name="gen", kind="generation", path="y", metric="f1"),
        BenchmarkSpec(name="ppl", kind="perplexity", domain="d", ceiling=2.0),
    ])
    base = {"mc": {"blank_ppl": 0.25, "chance": 0.25}, "gen": {"f1": 0.1, "chance": 0.0}, "ppl": {"loss": 4.0}}
    obj = Objective.from_references(spec, base, [{**base, "ppl": {"loss": 3.9}}])
    norm = obj.normalized({"mc": {"blank_ppl": 0.5}, "gen": {"f1": 0.4}, "ppl": {"loss": 3.0}})
    assert norm == {"mc": pytest.approx(0.5), "gen": pytest.approx(0.4), "ppl": pytest.approx(0.5)}
    refs = obj.references()  # written to proposal.json, in each metric's own units
    assert refs["ppl"] == {"metric": "loss", "capability": "general", "zero": 4.0, "one": 2.0}
    assert (refs["mc"]["zero"], refs["mc"]["one"], refs["gen"]["zero"]) == (0.25, 0.75, 0.0)
    assert obj.weights() == {"general": 1.0}


def test_objective_rejects_a_ceiling_below_the_zero_point() -> None:
    spec = EvalSpec(benchmarks=[BenchmarkSpec(name="ppl", kind="perplexity", domain="d", ceiling=4.5)])
    with pytest.raises(MergemixError, match=r"'ppl': ceiling 4.5 is no better than .* \(4, the base\)"):
        Objective.from_references(spec, {"ppl": {"loss": 4.0}}, [{"ppl": {"loss": 3.0}}])
    with pytest.raises(ValueError, match=r"ceiling of acc must lie in \(0, 1\], got 80"):
        BenchmarkSpec(name="mc", kind="multiple_choice", path="x", metric="acc", ceiling=80)


def test_shared_context_scoring_matches_whole_sequences(tiny_lm: tuple[Any, Any]) -> None:
    """Contexts run once with their cache copied to each continuation score what whole sequences score,
    including a request scored from its first token on (nothing to predict it from: it is skipped)."""
    model, tok = tiny_lm

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tok(text, add_special_tokens=False)["input_ids"])

    texts = [("the quick brown", " fox"), ("the quick brown", " dog jumps over"), ("1 + 2 =", " 3"),
             ("", "lazy dog"), ("over the lazy dog and the quick brown", " fox")]
    requests = [Request(ids(c + o), len(ids(c + o)) - len(ids(c))) for c, o in texts]
    shared = score_requests(model, requests, batch_size=2)
    whole = _score_whole(model, [r.ids for r in requests], [min(r.n, len(r.ids) - 1) for r in requests])
    assert [n for _, n in shared] == [n for _, n in whole]
    assert [lp for lp, _ in shared] == pytest.approx([lp for lp, _ in whole], abs=1e-4)
    assert _score_shared(model, [ids("1 + 2 =")], [0, 0], [ids(" 3"), ids(" 4")]) is not None  # the cached path ran


def test_shared_scoring_stays_inside_a_learned_position_table() -> None:
    """Padding after a short continuation must not index past a GPT-2-style position table."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mergemix.evaluate.kinds import Request, score_requests

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()
    # a 16-token request with a 12-token prefix beside one whose 8-token continuation widens the batch
    requests = [Request(tuple(range(1, 17)), 4), Request((40, 41, 42, *range(20, 28)), 8)]
    shared = score_requests(model, requests, batch_size=8)
    for req, (lp, n) in zip(requests, shared, strict=True):
        logits = model(input_ids=torch.tensor([req.ids])).logits[0].float().log_softmax(-1)
        whole = sum(logits[i - 1, req.ids[i]].item() for i in range(len(req.ids) - req.n, len(req.ids)))
        assert n == req.n and lp == pytest.approx(whole, abs=1e-4)


def test_an_option_at_the_very_start_is_scored_from_bos(tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = tiny_lm
    path = tmp_path / "mc.jsonl"
    rows = [{"question": "", "choices": ["fox", "dog"], "answer": 0, "blank": "___ jumps over the lazy dog"}] * 2
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = BenchmarkSpec(name="mc", kind="multiple_choice", path=str(path))
    bench = MultipleChoice(spec, EvalContext(tok, 64, {}, tmp_path, 8, 0), MultipleChoice.read(spec, tmp_path))
    for req in bench.requests:
        assert req.ids[0] == tok.eos_token_id  # no BOS in this tokenizer: EOS starts the text, as in lm-eval
        assert req.n == len(req.ids) - 1  # every token of the option and text is scored


def test_split_guard_looks_inside_folders(tmp_path: Path) -> None:
    from mergemix.evaluate import _refuse_test_files

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "valid.jsonl").write_text("{}\n")
    _refuse_test_files(str(tmp_path / "data"), tmp_path)
    (tmp_path / "data" / "test.jsonl").write_text("{}\n")
    for source in (tmp_path / "data", tmp_path / "data" / "*.jsonl"):
        with pytest.raises(MergemixError, match="test.jsonl, which looks like a test split"):
            _refuse_test_files(str(source), tmp_path)


def _noisy_spec(policy: str) -> EvalSpec:
    return EvalSpec(benchmarks=[
        BenchmarkSpec(name="ppl", kind="perplexity", domain="d", capability="a"),
        BenchmarkSpec(name="mc", kind="multiple_choice", path="x", metric="score", capability="a"),
        BenchmarkSpec(name="mc2", kind="multiple_choice", path="y", metric="score", capability="b"),
    ], low_signal=policy)


# mc moves by 0.01 over base and experts with a standard error of 0.05: within its item noise
_BASE = {"ppl": {"loss": 4.0, "loss_se": 0.01}, "mc": {"score": 0.10, "score_se": 0.05},
         "mc2": {"score": 0.2, "score_se": 0.01}}
_EXPERTS = [{"ppl": {"loss": 3.0, "loss_se": 0.01}, "mc": {"score": 0.11, "score_se": 0.05},
             "mc2": {"score": 0.4, "score_se": 0.01}},
            {"ppl": {"loss": 3.5, "loss_se": 0.01}, "mc": {"score": 0.105, "score_se": 0.05},
             "mc2": {"score": 0.3, "score_se": 0.01}}]


def test_low_signal_benchmark_is_dropped_before_the_search(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        obj = Objective.from_references(_noisy_spec("drop"), _BASE, _EXPERTS)
    assert "benchmark mc: its spread over the base and the experts" in caplog.text and "dropped" in caplog.text
    assert "ppl" not in caplog.text and "mc2" not in caplog.text
    assert obj.noise["mc"].low and obj.noise["mc"].weight == 0.0 and obj.noise["ppl"].weight == 1.0
    # capability a is ppl alone now, and weighs half as much (one of its two benchmarks left)
    _, caps, value = obj(_EXPERTS[0])
    assert caps["a"] == pytest.approx(1.0)
    assert obj.weights() == {"a": 0.5, "b": 1.0}
    assert value == pytest.approx((0.5 * caps["a"] + caps["b"]) / 1.5)
    assert obj.coefficients() == {"ppl": pytest.approx(1 / 3), "mc": 0.0, "mc2": pytest.approx(2 / 3)}


def test_low_signal_downweight_and_keep() -> None:
    down = Objective.from_references(_noisy_spec("downweight"), _BASE, _EXPERTS)
    assert down.noise["mc"].weight == pytest.approx(0.01 / 0.05)  # spread / (ratio 1 x stderr)
    keep = Objective.from_references(_noisy_spec("keep"), _BASE, _EXPERTS)
    assert keep.noise["mc"].low and keep.noise["mc"].weight == 1.0
    assert keep.weights() == {"a": 1.0, "b": 1.0}
    off = EvalSpec(benchmarks=_noisy_spec("drop").benchmarks, low_signal_ratio=0)
    assert not Objective.from_references(off, _BASE, _EXPERTS).noise["mc"].low


def test_all_benchmarks_low_signal_keeps_them(caplog: pytest.LogCaptureFixture) -> None:
    spec = EvalSpec(benchmarks=[BenchmarkSpec(name="mc", kind="multiple_choice", path="x", metric="score")])
    with caplog.at_level("WARNING"):
        obj = Objective.from_references(spec, _BASE, _EXPERTS)
    assert "every weighted benchmark is low-signal" in caplog.text
    assert obj.noise["mc"].low and obj.noise["mc"].weight == 1.0


def test_scoring_passes_the_cache_by_the_models_own_argument(tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
    """The shared question's key/value cache goes back through the argument this transformers takes: no
    deprecation warning (which would be an error in the next release), and the scores of a run without the
    shared cache."""
    import warnings

    from mergemix.evaluate.kinds import _score_whole, score_requests

    model, tok = tiny_lm
    items = [{"question": "the quick brown", "choices": ["fox", "dog jumps", "0 1"], "answer": 0},
             {"question": "1 + 2 =", "choices": ["3", "4 4"], "answer": 0}]
    spec = BenchmarkSpec(name="mc", kind="multiple_choice", path=str(_mc_file(tmp_path, items)))
    bench = MultipleChoice(spec, _ctx(tok, tmp_path), MultipleChoice.read(spec, tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        shared = score_requests(model, bench.requests, 8)
    whole = _score_whole(model, [r.ids for r in bench.requests], [r.n for r in bench.requests])
    for (a, n), (b, m) in zip(shared, whole, strict=True):
        assert n == m and a == pytest.approx(b, abs=1e-4)


def test_bf16_scoring_stays_within_tolerance_of_fp32(tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
    from mergemix.evaluate import Evaluator

    model, tok = tiny_lm
    items = [{"question": f"{i} + {i} =", "choices": [str(2 * i), str(2 * i + 1), "fox"], "answer": 0}
             for i in range(12)]
    spec = BenchmarkSpec(name="mc", kind="multiple_choice", path=str(_mc_file(tmp_path, items)))
    data = {"mc": MultipleChoice.read(spec, tmp_path)}
    fp32 = Evaluator([spec], EvalContext(tok, 16, {}, tmp_path, 4, 0), data).items(model)["mc"]
    bf16 = Evaluator([spec], EvalContext(tok, 16, {}, tmp_path, 4, 0, torch.bfloat16), data).items(model)["mc"]
    torch.testing.assert_close(bf16["score"], fp32["score"], rtol=0, atol=0.05)
    assert not torch.equal(bf16["score"], fp32["score"])  # autocast did run the forward passes in bf16
