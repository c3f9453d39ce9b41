"""The tokenizer (a fast WordPiece, ids only) and how texts become token ids: special tokens, truncation."""

from __future__ import annotations

import hashlib

from hybridlib.errors import DataError
from hybridlib.hub import go_offline, hub_reachable
from hybridlib.locations import tokenizer_folder


def load_tokenizer(name: str):
    """A fast tokenizer from a local folder or a hub id (offline: cache only, clear error)."""
    from transformers import AutoTokenizer  # heavy: loaded when a tokenizer is

    local = tokenizer_folder(name)
    if local is not None:
        try:
            tok = AutoTokenizer.from_pretrained(str(local), use_fast=True)
        except Exception as e:  # transformers raises many types here
            raise DataError(
                f"Could not load a tokenizer from folder '{name}': {e}. The folder needs tokenizer files "
                f"(vocab.txt + tokenizer_config.json, or tokenizer.json)."
            ) from None
    else:
        offline = not hub_reachable()
        if offline:
            go_offline()
        try:
            tok = AutoTokenizer.from_pretrained(name, use_fast=True)
        except Exception as e:
            if offline:
                raise DataError(
                    f"Tokenizer '{name}' is not a local folder and the Hugging Face hub is unreachable "
                    f"(offline). Point 'tokenizer' at a local folder (e.g. -p tokenizer ../shared/tokenizers/bert-base-uncased), "
                    f"or set HYBRIDLIB_TOKENIZERS_DIR to a folder holding {name}/."
                ) from None
            raise DataError(f"Could not load tokenizer '{name}': {e}") from None
    if not tok.is_fast:
        raise DataError(f"Tokenizer '{name}' has no fast (Rust) implementation; hybridlib needs a fast tokenizer.")
    if tok.pad_token_id is None:
        raise DataError(f"Tokenizer '{name}' defines no padding token; use a tokenizer with one (e.g. BERT's).")
    return tok


def tokenizer_fingerprint(tok) -> str:
    """A short hash of the tokenizer's vocabulary and class (identifies it in caches and checkpoints)."""
    h = hashlib.sha256(type(tok).__name__.encode())
    for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{token}\n".encode())
    h.update(repr(getattr(tok, "do_lower_case", None)).encode())
    return h.hexdigest()[:16]


def special_tokens(tok) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single text (BERT: [CLS] and [SEP])."""
    plain = tok("hello", add_special_tokens=False)["input_ids"]
    full = tok("hello", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    return [], []


def token_ids(tok, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, without special tokens and uncut.

    Calls the Rust tokenizer directly, and its batch encoder that skips character offsets (never used
    here) when it has one: less work than ``tok(texts)``, same ids. A backend configured to
    truncate or pad by itself goes through ``tok(...)``, which switches that off for the call.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tok(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(list(texts), add_special_tokens=False)]


def encode_texts(tok, texts: list[str], max_length: int, truncation: str) -> tuple[list[list[int]], list[int]]:
    """Token ids with special tokens, cut to ``max_length`` keeping the head (or head and tail),
    and each text's full length before the cut (for the truncation statistics of 01)."""
    prefix, suffix = special_tokens(tok)
    n_special = len(prefix) + len(suffix)
    budget = max(max_length - n_special, 1)
    head = budget if truncation == "head" else max(budget // 4, min(budget, 1))
    enc = token_ids(tok, texts)
    out = []
    for ids in enc:
        if len(ids) > budget:
            ids = ids[:head] + (ids[len(ids) - (budget - head) :] if budget > head else [])
        out.append(prefix + ids + suffix)
    return out, [len(ids) + n_special for ids in enc]
