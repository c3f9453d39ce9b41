"""Which tokens pushed a prediction: gradient × input or occlusion attributions per token and word.

``Predictor.explain(text)`` returns the prediction plus, for every token the model read, a score:
positive = the token pushed the decision towards the explained class, negative = away from it.

- ``method="gradient"`` (default): gradient × input on the embeddings, of the explained class's
  log-probability. One forward and one backward pass: fast enough for an interactive widget.
- ``method="occlusion"``: the drop in that log-probability when the token's embedding is zeroed
  (replaced by the padding embedding). One forward pass per token (batched); slower, easier to read.

Scores are also summed per word (word pieces of one word together), with each word's character span
in the original text, so the text can be shown highlighted.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from hybridlib.errors import DataError
from hybridlib.tokens import cut, shorten, special_tokens, truncation_budget

METHODS = ("gradient", "occlusion")


def _target_index(predictor, target: str | int) -> int:
    names = predictor.label_names
    if isinstance(target, str) and target in names:
        return names.index(target)
    if isinstance(target, numbers.Integral) and 0 <= target < len(names):
        return int(target)
    raise DataError(f"explain(target={target!r}): not a class of this model; use one of {names} or 0-{len(names) - 1}.")


def _encode_with_spans(predictor, text: str) -> tuple[list[int], list[tuple[int, int] | None], list[int | None], bool]:
    """The ids the model reads for ``text`` (as Predictor.encode), each token's character span in
    ``text`` (None for special tokens) and word index; and whether tokens were cut."""
    tok, cfg = predictor.tokenizer, predictor.cfg
    short, end, shift = shorten(tok, text, cfg.max_length, cfg.truncation)
    enc = tok(short, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    words = list(enc.word_ids()) if hasattr(enc, "word_ids") else list(range(len(ids)))
    prefix, suffix = special_tokens(tok)
    head, tail = truncation_budget(len(prefix) + len(suffix), cfg.max_length, cfg.truncation)
    truncated = len(ids) > head + tail or short is not text
    ids, offsets, words = (cut(x, head, tail) for x in (ids, offsets, words))
    # map positions in the shortened text back to the original
    offsets = [(s + shift, e + shift) if s > end else (s, e) for s, e in offsets]
    spans: list[tuple[int, int] | None] = [None] * len(prefix) + offsets + [None] * len(suffix)
    words = [None] * len(prefix) + words + [None] * len(suffix)
    return prefix + ids + suffix, spans, words, truncated


def _gradient_x_input(predictor, batch, mask, target: int | None):
    """(log-probabilities (C,), per-position scores (T,), target) by gradient × input."""
    model = predictor.model
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        output = output.detach().requires_grad_(True)
        captured["emb"] = output
        return output

    handle = model.embedding.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logp = torch.log_softmax(model(batch, mask).float(), dim=1)[0]
            t = int(logp.argmax()) if target is None else target
            (grad,) = torch.autograd.grad(logp[t], captured["emb"])
    finally:
        handle.remove()
    scores = (grad * captured["emb"]).sum(-1)[0]
    return logp.detach(), scores.detach(), t


@torch.no_grad()
def _occlusion(predictor, batch, mask, target: int | None, positions: list[int]):
    model = predictor.model
    logp = torch.log_softmax(model(batch, mask).float(), dim=1)[0]
    t = int(logp.argmax()) if target is None else target
    scores = torch.zeros(batch.size(1), device=batch.device)
    for start in range(0, len(positions), predictor.batch_size):
        pos = torch.as_tensor(positions[start : start + predictor.batch_size], device=batch.device)
        occluded = batch.repeat(len(pos), 1)
        occluded[torch.arange(len(pos), device=batch.device), pos] = predictor.pad_id  # zero embedding, mask kept
        lp = torch.log_softmax(model(occluded, mask.repeat(len(pos), 1)).float(), dim=1)[:, t]
        scores[pos] = logp[t] - lp
    return logp, scores, t


def explain(predictor, text: str, method: str = "gradient", target: str | int | None = None) -> dict[str, Any]:
    """Predict ``text`` and attribute the decision (or class ``target``) to its tokens.

    Returns the keys of ``Predictor.predict`` (``label``, ``index``, ``probabilities``) plus:
    ``target`` (the explained class name), ``method``, ``tokens`` / ``scores`` / ``spans`` (per token the
    model read, special tokens left out; span = (start, end) in ``text``), ``words`` (list of
    {"text", "start", "end", "score"}: word pieces summed per word, in text order) and ``truncated``
    (True when the model did not read the whole text).
    """
    if not isinstance(text, str):
        raise DataError("explain() takes one string.")
    if method not in METHODS:
        raise DataError(f"explain(method={method!r}): use one of {METHODS}.")
    ids, spans, word_ids, truncated = _encode_with_spans(predictor, text)
    batch = predictor.collate([{"input_ids": ids}])
    batch, mask = batch["input_ids"].to(predictor.device), batch["attention_mask"].to(predictor.device)
    target = None if target is None else _target_index(predictor, target)
    keep = [i for i, s in enumerate(spans) if s is not None]  # the text's tokens, not the special ones
    if method == "gradient":
        logp, scores, t = _gradient_x_input(predictor, batch, mask, target)
    else:
        logp, scores, t = _occlusion(predictor, batch, mask, target, keep)
    probs = logp.exp().cpu().numpy()
    probs = probs / probs.sum()
    out = predictor.result(probs)
    scores = scores.cpu().tolist()
    out.update(
        target=predictor.label_names[t],
        method=method,
        tokens=predictor.tokenizer.convert_ids_to_tokens([ids[i] for i in keep]),
        scores=[float(scores[i]) for i in keep],
        spans=[spans[i] for i in keep],
        truncated=truncated,
    )
    words: list[dict[str, Any]] = []
    last_word = None
    for i in keep:  # pieces of one word are adjacent: head and tail never merge
        (s, e), w = spans[i], word_ids[i]
        if words and w is not None and w == last_word and s - words[-1]["end"] <= 1:
            words[-1]["end"] = max(words[-1]["end"], e)
            words[-1]["score"] += float(scores[i])
        else:
            words.append({"start": s, "end": e, "score": float(scores[i])})
        last_word = w
    for w in words:
        w["text"] = text[w["start"] : w["end"]]
    out["words"] = words
    return out
