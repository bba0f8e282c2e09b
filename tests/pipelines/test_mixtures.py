"""The proposed mixture for a trainer: Megatron-LM's --data-path, JSON and YAML files, and an IterableDataset
drawn at the proposal's ratios within its epoch caps."""

from __future__ import annotations

import json
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from mergemix.artifacts import read_json, write_json
from mergemix.cli import main
from mergemix.pipelines.mixtures import mixture_dataset, mixture_record, read_proposal
from mergemix.pipelines.propose import propose
from mergemix.proposal import Proposal
from mergemix.recipe import load_recipe
from tests.conftest import micro_recipe_dict

pytestmark = pytest.mark.slow
RATIOS = {"math": 0.5, "prose": 0.3, "code": 0.2}


@pytest.fixture(scope="module")
def run(micro_data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro run whose domains hold 1,000 documents of equal length each, its proposal set to RATIOS with
    epochs 20, 12 and 8 (1,000 documents each: streams of 20,000, 12,000 and 8,000 documents)."""
    root = tmp_path_factory.mktemp("mixtures")
    raw = micro_recipe_dict(micro_data, root / "run", root / "cache")
    for d in raw["data"]["domains"]:
        path = root / f"{d['name']}.jsonl"
        path.write_text("".join(json.dumps({"text": f"{d['name']} document {i:05d} " + "x" * 40}) + "\n"
                                for i in range(1000)))
        d.update(source=str(path), text_field="text")
    raw["data"]["domains"][0]["megatron_prefix"] = "/data/math_text_document"
    recipe_file = root / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(raw))
    propose(load_recipe(recipe_file))
    proposal = read_json(root / "run" / "proposal.json")
    for share in proposal["mixture"]:
        share.update(ratio=RATIOS[share["domain"]], alpha=RATIOS[share["domain"]],
                     epochs=RATIOS[share["domain"]] * 40, tokens=round(RATIOS[share["domain"]] * 100000))
    write_json(root / "run" / "proposal.json", proposal)
    return root / "run"


def test_every_export_opens_in_its_consumer(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proposal = Proposal.model_validate(read_json(run / "proposal.json"))
    assert main(["export", str(run), "--format", "megatron"]) == 0
    args = shlex.split((run / "megatron_data_path.txt").read_text())
    # Megatron-LM's --data-path: a flat list, weight then prefix (megatron.core.datasets.utils.get_blend_from_list)
    assert args[0] == "--data-path" and len(args[1:]) % 2 == 0
    blend = dict(zip(args[2::2], map(float, args[1::2]), strict=True))
    assert blend == {"/data/math_text_document": 0.5, "prose": 0.3, "code": 0.2}
    for fmt, load in (("json", json.loads), ("yaml", yaml.safe_load)):
        assert main(["export", str(run), "--format", fmt]) == 0
        assert load((run / f"mixture.{fmt}").read_text()) == mixture_record(proposal)
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["export", str(run), "--format", "csv"])
    assert "invalid choice: 'csv' (choose from 'model', 'megatron', 'json', 'yaml')" in capsys.readouterr().err


def test_the_dataset_draws_the_ratios_and_keeps_the_epoch_caps(run: Path) -> None:
    draws = list(mixture_dataset(run, seed=0).take(20000))
    share = Counter(d["domain"] for d in draws)
    for domain, ratio in RATIOS.items():
        assert abs(share[domain] / len(draws) - ratio) < 0.01, (domain, share)
    everything = Counter(d["text"] for d in mixture_dataset(run, seed=1))
    caps = {s.domain: s.epochs for s in read_proposal(load_recipe(run / "recipe.resolved.yaml",
                                                                  [f"run_dir={run}"])).mixture}
    for text, n in everything.items():
        assert n <= caps[text.split()[0]], text  # no document drawn more often than its domain's epochs
