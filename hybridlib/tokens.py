"""The tokenizer (a fast WordPiece, ids only) and how texts become token ids: special tokens, truncation."""

from __future__ import annotations

import hashlib
import re

from hybridlib.errors import DataError
from hybridlib.hub import go_offline, hub_reachable
from hybridlib.locations import tokenizer_folder

_SPACE = re.compile(r"\s")


def load_tokenizer(name: str):
    """A fast tokenizer from a local folder or a hub id (offline: cache only, clear error)."""
    from transformers import AutoTokenizer  # heavy: loaded when a tokenizer is

    local = tokenizer_folder(name)
    if local is not None:
        if not any((local / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json")):  # before transformers
            raise DataError(f"Tokenizer folder '{name}' holds no tokenizer: it needs tokenizer.json, or vocab.txt + "
                            f"tokenizer_config.json. Point 'tokenizer' at such a folder (e.g. a run's tokenizer/).")
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
    """Each text's token ids, without special tokens and uncut: the Rust tokenizer's batch encoder without character
    offsets (same ids as ``tok(texts)``); a backend that truncates or pads by itself goes through ``tok(...)``."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tok(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(list(texts), add_special_tokens=False)]


def truncation_budget(n_special: int, max_length: int, truncation: str) -> tuple[int, int]:
    """(head, tail): how many text tokens the model reads from a text's start and end, besides ``n_special``
    special tokens."""
    budget = max(max_length - n_special, 1)
    head = budget if truncation == "head" else max(budget // 4, min(budget, 1))
    return head, budget - head


def cut(seq: list, head: int, tail: int) -> list:
    """``seq`` (token ids, or anything per token) without its middle: its first ``head`` and last ``tail`` items."""
    return seq if len(seq) <= head + tail else seq[:head] + seq[len(seq) - tail :]


def encode_texts(tok, texts: list[str], max_length: int, truncation: str) -> tuple[list[list[int]], list[int]]:
    """Token ids with special tokens, cut to ``max_length`` keeping the head (or head and tail),
    and each text's full length before the cut (for the truncation statistics of 01)."""
    prefix, suffix = special_tokens(tok)
    n_special = len(prefix) + len(suffix)
    head, tail = truncation_budget(n_special, max_length, truncation)
    enc = token_ids(tok, texts)
    return [prefix + cut(ids, head, tail) + suffix for ids in enc], [len(ids) + n_special for ids in enc]


def shorten(tok, text: str, max_length: int, truncation: str) -> tuple[str, int, int]:
    """(short text, cut, shift): a very long text (a book) cut to its head (and tail), at whitespace, when that
    provably keeps every token the model reads (else unchanged, cut = len); position p > cut was p + shift."""
    n, cap = len(text), max(10_000, 40 * max_length)
    if n <= 2 * cap + 1:
        return text, n, 0
    head, tail = truncation_budget(sum(map(len, special_tokens(tok))), max_length, truncation)
    h_end = max((m.start() for m in _SPACE.finditer(text, cap // 2, cap)), default=None)
    t_start = next((m.start() for m in _SPACE.finditer(text, n - cap, n - cap // 2)), None) if tail else n
    if h_end is None or t_start is None:  # no whitespace to cut at (e.g. one huge "word")
        return text, n, 0
    parts = [text[:h_end]] + ([text[t_start:]] if tail else [])
    counts = [len(x) for x in token_ids(tok, parts)]
    if counts[0] < head or (tail and counts[1] < tail):
        return text, n, 0  # whitespace-heavy text: too few tokens in the kept parts
    if not tail:
        return parts[0], h_end, 0
    return parts[0] + " " + parts[1], h_end, t_start - h_end - 1
