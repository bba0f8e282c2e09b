"""Documents → deduplicated, split pools → packed token blocks, cached by content hash.

Each domain's documents are assigned at random (by a seeded hash of the document) to three pools:
`heldout` (never trained on; held-out loss), `base` (pre-training of the demo base only) and `expert`
(experts and mixture runs). With one shared pool, experts barely specialise (docs/fidelity.md,
"Sizing notes": own-domain held-out loss fell 4.41→4.19 for prose only once experts saw text the base had not).
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mergemix.artifacts import Hasher, atomic_path, read_json, stable_hash, write_json
from mergemix.data.readers import read_texts
from mergemix.errors import MergemixError
from mergemix.progress import progress
from mergemix.recipe import DomainSpec, SplitSpec

log = logging.getLogger(__name__)

POOLS = ("heldout", "base", "expert")
PACK_VERSION = 1


@dataclass(frozen=True)
class DomainDocs:
    """A domain's documents, split into pools. `content_hash` covers the texts and the split."""

    name: str
    pools: dict[str, list[str]]
    content_hash: str


@dataclass(frozen=True)
class DomainBlocks:
    """Packed token blocks per pool, int64 tensors of shape (n_blocks, seq_len)."""

    name: str
    blocks: dict[str, torch.Tensor]
    n_tokens: int  # tokens over all pools (before cutting into blocks)
    content_hash: str


def dedupe_paragraphs(texts: list[str]) -> tuple[list[str], int]:
    """Drop exact-duplicate paragraphs (blank-line separated) across a domain, keeping the first.

    Licence and changelog text is often more than half duplicates. Returns (texts, paragraphs dropped).
    """
    seen: set[bytes] = set()
    out, dropped = [], 0
    for text in texts:
        kept = []
        for para in text.split("\n\n"):
            key = hashlib.blake2b(para.strip().encode(), digest_size=16).digest()
            if para.strip() and key in seen:
                dropped += 1
                continue
            seen.add(key)
            kept.append(para)
        joined = "\n\n".join(kept)
        if joined.strip():
            out.append(joined)
    return out, dropped


def _pool_of(text: str, seed: int, split: SplitSpec) -> str:
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < split.heldout:
        return "heldout"
    if u < split.heldout + split.base:
        return "base"
    return "expert"


def load_domain(spec: DomainSpec, split: SplitSpec, seed: int, cache_dir: Path) -> DomainDocs:
    """Read, deduplicate, cap and split one domain's documents. Errors name the domain and source."""
    try:
        texts = read_texts(spec.source, spec.format, spec.text_field, cache_dir)
    except MergemixError as e:
        raise MergemixError(f"domain {spec.name!r}: {e}") from None
    texts, dropped = dedupe_paragraphs(texts)
    if dropped:
        log.info("domain %s: dropped %d duplicate paragraphs", spec.name, dropped)
    if spec.max_chars is not None:
        random.Random(seed).shuffle(texts)
        kept, total = [], 0
        for t in texts:
            if total >= spec.max_chars:
                break
            kept.append(t[: spec.max_chars - total])
            total += len(kept[-1])
        texts = kept
    if not texts:
        raise MergemixError(
            f"domain {spec.name!r}: {spec.source} holds no text (after removing empty and duplicate "
            "paragraphs); point source at files with text or drop the domain"
        )
    pools: dict[str, list[str]] = {p: [] for p in POOLS}
    for t in texts:
        pools[_pool_of(t, seed, split)].append(t)
    h = Hasher().update(f"split {split.heldout} {split.base} {seed}")
    for pool in POOLS:
        h.update(pool)
        for t in pools[pool]:
            h.update(t)
    docs = DomainDocs(spec.name, pools, h.hexdigest())
    for pool in ("heldout", "expert"):
        if not pools[pool]:
            raise MergemixError(
                f"domain {spec.name!r}: its {pool} pool is empty ({len(texts)} documents); add data or "
                "change data.split (documents are split whole, so a single large file needs splitting)"
            )
    return docs


def tokenizer_hash(tokenizer: object) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())  # type: ignore[attr-defined]
    return stable_hash(blob)


def pack_texts(texts: list[str], tokenizer: object, seq_len: int, desc: str = "") -> tuple[torch.Tensor, int]:
    """Tokenize, join documents with EOS and cut into (n, seq_len) blocks; the tail shorter than a block is
    dropped. Returns (blocks, tokens before cutting)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    chunk = 256
    for i in progress(range(0, len(texts), chunk), desc=f"tokenize {desc}", leave=False, disable=len(texts) < 4 * chunk):
        enc = tokenizer(texts[i : i + chunk], add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        for seq in enc:
            ids.extend(seq)
            if eos is not None:
                ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len), len(ids)


def pack_domain(docs: DomainDocs, tokenizer: object, seq_len: int, cache_dir: Path) -> DomainBlocks:
    """Token blocks of every pool of a domain, from the cache when texts, tokenizer and seq_len match."""
    key = stable_hash([docs.content_hash, tokenizer_hash(tokenizer), seq_len, PACK_VERSION])
    path = Path(cache_dir) / "packed" / f"{docs.name}-{key}.safetensors"
    if path.exists():
        tensors = load_file(str(path))
        meta = read_json(path.with_suffix(".json"))
        return DomainBlocks(docs.name, {p: tensors[p] for p in POOLS}, meta["n_tokens"], key)
    blocks, n_tokens = {}, 0
    for pool in POOLS:
        blocks[pool], n = pack_texts(docs.pools[pool], tokenizer, seq_len, desc=f"{docs.name}/{pool}")
        n_tokens += n
    for pool in ("heldout", "expert"):
        if len(blocks[pool]) == 0:
            raise MergemixError(
                f"domain {docs.name!r}: its {pool} pool has fewer than seq_len={seq_len} tokens; add data, "
                "lower data.seq_len or change data.split"
            )
    # the metadata first: the blocks file is what marks the cache entry complete
    write_json(path.with_suffix(".json"), {"n_tokens": n_tokens, "domain": docs.name})
    with atomic_path(path) as tmp:
        save_file({p: b.contiguous() for p, b in blocks.items()}, str(tmp))
    log.info(
        "domain %s: %s tokens; blocks %s",
        docs.name,
        f"{n_tokens:,}",
        ", ".join(f"{p} {len(b)}" for p, b in blocks.items()),
    )
    return DomainBlocks(docs.name, blocks, n_tokens, key)
