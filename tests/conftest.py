"""Shared fixtures: micro domains written as local files, and a micro recipe (a 1-layer, hidden-32 base
pre-trained for a few steps) that runs the whole pipeline in seconds."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml


def _write_domains(root: Path) -> dict[str, str]:
    """Four small domains in four formats; returns domain → source."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    # jsonl with a custom text field
    with open(root / "math.jsonl", "w") as f:
        for _ in range(300):
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            f.write(json.dumps({"body": f"{a} + {b} = {a + b}\n{a} - {b} = {a - b}"}) + "\n")
    # plain text files (a glob)
    words = "the cat sat on a mat while birds sang over quiet green hills near old towns".split()
    (root / "prose").mkdir(exist_ok=True)
    for i in range(60):
        paras = [" ".join(rng.choice(words) for _ in range(30)).capitalize() + "." for _ in range(4)]
        (root / "prose" / f"doc{i}.txt").write_text("\n\n".join(paras))
    # parquet
    import pyarrow as pa
    import pyarrow.parquet as pq

    code = [f"def f{i}(x):\n    return x * {i} + {rng.randint(0, 9)}\n" * 3 for i in range(300)]
    pq.write_table(pa.table({"text": code}), root / "code.parquet")
    # a datasets.save_to_disk directory
    import datasets

    facts = [f"Town {rng.randint(0, 99)} has {rng.randint(1, 9)} bridges and {rng.randint(1, 9)} mills." * 2
             for _ in range(300)]
    datasets.Dataset.from_dict({"text": facts}).save_to_disk(str(root / "facts_ds"))
    return {
        "math": str(root / "math.jsonl"),
        "prose": str(root / "prose" / "*.txt"),
        "code": str(root / "code.parquet"),
        "facts": str(root / "facts_ds"),
    }


def _write_mc(path: Path) -> None:
    rng = random.Random(1)
    with open(path, "w") as f:
        for _ in range(20):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            choices = [str(a + b), str(a + b + 1), str(a + b + 2)]
            f.write(json.dumps({"question": f"{a} + {b} =", "choices": choices, "answer": 0}) + "\n")


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("micro_data")
    sources = _write_domains(root)
    _write_mc(root / "mc.jsonl")
    (root / "target.txt").write_text("def g(x):\n    return x + 1  # the cat sat\n" * 200)
    return {"root": root, "sources": sources, "mc": str(root / "mc.jsonl"), "target": str(root / "target.txt")}


def micro_recipe_dict(micro_data: dict[str, Any], run_dir: Path, cache_dir: Path) -> dict[str, Any]:
    s = micro_data["sources"]
    return {
        "name": "micro",
        "seed": 0,
        "run_dir": str(run_dir),
        "cache_dir": str(cache_dir),
        "device": "cpu",
        "data": {
            "seq_len": 32,
            "split": {"heldout": 0.15, "base": 0.45},
            "domains": [
                {"name": "math", "source": s["math"], "text_field": "body"},
                {"name": "prose", "source": s["prose"]},
                {"name": "code", "source": s["code"]},
            ],
        },
        "base": {"demo": {"hidden": 32, "layers": 1, "heads": 2, "ffn": 64, "vocab": 300, "steps": 30,
                          "lr": 5e-3, "warmup_steps": 3, "batch_size": 8}},
        "experts": {"steps": 6, "batch_size": 8, "lr": 2e-3, "warmup_steps": 1, "replay": 0.25,
                    "checkpoint_every": 3},
        "evaluation": {
            "batch_size": 16,
            "benchmarks": [
                {"name": "target", "kind": "perplexity", "path": micro_data["target"], "capability": "coding",
                 "max_items": 16},
                {"name": "math_heldout", "kind": "perplexity", "domain": "math", "capability": "math",
                 "max_items": 16},
                {"name": "sums", "kind": "multiple_choice", "path": micro_data["mc"], "capability": "math"},
            ],
            "weights": {"coding": 1.0, "math": 1.0},
        },
        "search": {"strategy": "surface", "seeds": 8, "candidates": 400, "verify": 2, "surrogate": "lightgbm"},
        "mixture": {"total_tokens": 100000},
    }


@pytest.fixture
def micro_recipe_file(micro_data: dict[str, Any], tmp_path: Path) -> Path:
    """A micro recipe YAML in tmp_path whose run and cache live in tmp_path too."""
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(micro_recipe_dict(micro_data, tmp_path / "run", tmp_path / "cache")))
    return path


@pytest.fixture(scope="session")
def tiny_lm() -> tuple[Any, Any]:
    """(model, tokenizer): an untrained hidden-32, 1-layer Llama and a 300-token BPE tokenizer."""
    from mergemix.model.modeling import build_demo_model, train_tokenizer
    from mergemix.recipe import DemoBaseSpec

    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog 0123456789 + - = "] * 50, 300)
    spec = DemoBaseSpec(hidden=32, layers=1, heads=2, ffn=64, vocab=300)
    model = build_demo_model(spec, len(tok), 64, tok.eos_token_id, seed=0).eval()
    return model, tok
