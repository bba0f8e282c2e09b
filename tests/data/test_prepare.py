from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mergemix.data.prepare import POOLS, dedupe_paragraphs, load_domain, pack_domain, pack_texts
from mergemix.data.readers import read_texts
from mergemix.errors import MergemixError
from mergemix.model.modeling import train_tokenizer
from mergemix.recipe import DomainSpec, SplitSpec


def test_readers_for_every_format(micro_data: dict[str, Any], tmp_path: Path) -> None:
    s = micro_data["sources"]
    assert len(read_texts(s["math"], "auto", "body", tmp_path)) == 300
    assert len(read_texts(s["prose"], "auto", "text", tmp_path)) == 60
    assert len(read_texts(s["code"], "auto", "text", tmp_path)) == 300
    assert len(read_texts(s["facts"], "auto", "text", tmp_path)) == 300
    js = tmp_path / "d.json"
    js.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert read_texts(str(js), "auto", "text", tmp_path) == ["a", "b"]


def test_bad_jsonl_line_is_named(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(MergemixError, match=r"x.jsonl:2: not valid JSON"):
        read_texts(str(p), "auto", "text", tmp_path)


def test_missing_text_field_is_named(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text('{"content": "ok"}\n')
    with pytest.raises(MergemixError, match=r"x.jsonl:1: no field 'text' \(found: content\); set text_field"):
        read_texts(str(p), "auto", "text", tmp_path)


def test_missing_file_and_empty_glob(tmp_path: Path) -> None:
    with pytest.raises(MergemixError, match="no such file or directory"):
        read_texts(str(tmp_path / "none.jsonl"), "auto", "text", tmp_path)
    with pytest.raises(MergemixError, match="the glob matches no file"):
        read_texts(str(tmp_path / "*.txt"), "auto", "text", tmp_path)


def test_dedupe_drops_repeated_paragraphs() -> None:
    licence = "Permission is hereby granted, free of charge."
    texts, dropped = dedupe_paragraphs([f"A\n\n{licence}", f"B\n\n{licence}", licence])
    assert texts == [f"A\n\n{licence}", "B"] and dropped == 2


def test_split_is_disjoint_deterministic_and_seeded(micro_data: dict[str, Any], tmp_path: Path) -> None:
    spec = DomainSpec(name="code", source=micro_data["sources"]["code"])
    split = SplitSpec(heldout=0.2, base=0.3)
    a = load_domain(spec, split, 0, tmp_path)
    b = load_domain(spec, split, 0, tmp_path)
    c = load_domain(spec, split, 1, tmp_path)
    assert a.pools == b.pools and a.content_hash == b.content_hash
    assert a.pools != c.pools
    sets = [set(a.pools[p]) for p in POOLS]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert 0.1 < len(a.pools["heldout"]) / sum(map(len, sets)) < 0.3


def test_empty_domain_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_text('{"text": "   "}\n')
    with pytest.raises(MergemixError, match=r"domain 'e': .* holds no text"):
        load_domain(DomainSpec(name="e", source=str(p)), SplitSpec(), 0, tmp_path)


def test_pack_blocks_and_cache(micro_data: dict[str, Any], tmp_path: Path) -> None:
    docs = load_domain(DomainSpec(name="m", source=micro_data["sources"]["math"], text_field="body"), SplitSpec(), 0,
                       tmp_path)
    tok = train_tokenizer(docs.pools["base"], 300)
    blocks, n = pack_texts(["hello world"] * 10, tok, 4)
    assert blocks.shape[1] == 4 and blocks.shape[0] == n // 4
    packed = pack_domain(docs, tok, 16, tmp_path)
    again = pack_domain(docs, tok, 16, tmp_path)  # from the cache
    for pool in POOLS:
        assert packed.blocks[pool].shape[1] == 16
        assert (packed.blocks[pool] == again.blocks[pool]).all()
    assert packed.n_tokens == again.n_tokens > 0


def test_jsonl_log_cuts_a_torn_line_before_appending(tmp_path: Path) -> None:
    from mergemix.artifacts import append_jsonl, read_jsonl

    log = tmp_path / "t.jsonl"
    append_jsonl(log, {"a": 1})
    with open(log, "a") as f:
        f.write('{"a": 2, "b"')  # a writer killed mid-line
    assert read_jsonl(log) == [{"a": 1}]
    append_jsonl(log, {"a": 3})
    assert read_jsonl(log) == [{"a": 1}, {"a": 3}]
    log.write_text('{"torn": ')
    append_jsonl(log, {"a": 4})
    assert read_jsonl(log) == [{"a": 4}]


def test_undecodable_and_corrupt_files_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(MergemixError, match=r"latin1.jsonl:2: not valid UTF-8"):
        read_texts(str(bad), "auto", "text", tmp_path)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(MergemixError, match=r"broken.parquet: not a readable parquet file"):
        read_texts(str(broken), "auto", "text", tmp_path)


def test_text_with_undecodable_bytes_is_read_with_a_warning_naming_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("plain text")
    (tmp_path / "docs" / "b.txt").write_bytes(b"caf\xe9 au lait")
    with caplog.at_level("WARNING", logger="mergemix.data.readers"):
        texts = read_texts(str(tmp_path / "docs" / "*.txt"), "auto", "text", tmp_path)
    assert sorted(texts) == ["caf\ufffd au lait", "plain text"]
    (record,) = caplog.records
    assert "1 of 2 documents had bytes that are not UTF-8" in record.getMessage()
    assert str(tmp_path / "docs" / "b.txt") in record.getMessage()


def test_a_glob_can_name_saved_datasets(micro_data: dict[str, Any], tmp_path: Path) -> None:
    pattern = str(Path(micro_data["sources"]["facts"]).parent / "facts_*")
    assert len(read_texts(pattern, "auto", "text", tmp_path)) == 300


def test_atomic_directory_keeps_a_copy_another_process_wrote_first(tmp_path: Path) -> None:
    from mergemix.artifacts import atomic_path

    target = tmp_path / "base-abc"
    with atomic_path(target) as tmp:
        tmp.unlink()
        tmp.mkdir()
        (tmp / "weights").write_text("mine")
        target.mkdir()  # a concurrent build finished first
        (target / "weights").write_text("theirs")
    assert (target / "weights").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["base-abc"]  # no temporary left behind
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "missing" / "x") as tmp:
        tmp.unlink()
        tmp.mkdir()
        (tmp / "f").write_text("")
        raise FileNotFoundError("an error inside the block still propagates")
