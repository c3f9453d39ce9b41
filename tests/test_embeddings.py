"""hybridlib.embeddings: PPMI vectors from the training split, matrices from files, the vocabulary check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybridlib.config import Config
from hybridlib.embeddings import (
    cooccurrences,
    init_from_training_texts,
    load_pretrained_embeddings,
    ppmi_vectors,
    project,
    zero_unseen_rows,
)
from hybridlib.errors import ConfigError
from hybridlib.model import build_model, for_loading

V = 60


def corpus(n: int = 400, seed: int = 0) -> list[list[int]]:
    """Texts where tokens 10 and 11 are interchangeable (same neighbours: 20-24) and token 12 lives
    among other words (30-34); ids 40-59 never occur; 1 and 2 are [CLS]/[SEP]."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        word = rng.choice([10, 11, 12])
        ctx = range(20, 25) if word != 12 else range(30, 35)
        texts.append([1, *rng.choice(list(ctx), 3), word, *rng.choice(list(ctx), 3), 2])
    return texts


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_ppmi_vectors_put_words_with_the_same_neighbours_together():
    vec, seen = ppmi_vectors(corpus(), V, dim=8, skip=[1, 2])
    assert vec.shape == (V, 8)
    assert set(np.flatnonzero(seen)) == {10, 11, 12, *range(20, 25), *range(30, 35)}  # specials skipped
    assert cos(vec[10], vec[11]) > 0.9
    assert cos(vec[10], vec[11]) > cos(vec[10], vec[12]) + 0.5
    assert vec[seen].std() == pytest.approx(1.0)


def test_cooccurrences_are_weighted_by_distance_and_never_span_two_texts():
    counts = cooccurrences([[5, 7, 8], [6, 9], [1, 7, 1, 8]], 12, skip=[1], window=2).toarray()
    assert counts[5, 7] == counts[7, 5] == 1.0 and counts[5, 8] == 0.5
    assert counts[8, 6] == 0 and counts[5, 6] == 0  # 8 ends one text, 6 starts the next
    assert counts[6, 9] == 1.0
    assert counts[7, 8] == 1.0 + 0.5  # side by side in text 1; two apart in text 3 (the skipped [1] between)
    assert counts[1].sum() == 0


def test_ppmi_with_no_co_occurrences_is_refused_by_name():
    with pytest.raises(ConfigError, match="ppmi needs training texts"):
        ppmi_vectors([[3], [4]], V, dim=8)


def test_init_from_training_texts_overwrites_seen_rows_only():
    emb = torch.nn.Embedding(V, 8, padding_idx=0)
    before = emb.weight.detach().clone()
    n = init_from_training_texts(emb, corpus(), skip=[1, 2])
    after = emb.weight.detach()
    assert n == 13
    assert torch.equal(after[40:], before[40:])  # never seen: the random initialisation stays
    assert not torch.equal(after[10], before[10])
    assert torch.equal(after[0], torch.zeros(8))


def test_build_model_with_ppmi_needs_the_training_data(tiny_cfg, tiny_tokenizer):
    from hybridlib.data import prepare_data

    tiny_cfg.pretrained_embeddings = "ppmi"
    with pytest.raises(ConfigError, match="pass data="):
        build_model(tiny_cfg, len(tiny_tokenizer), 3)
    data = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    torch.manual_seed(0)
    plain = build_model(Config(**{**tiny_cfg.to_dict(), "pretrained_embeddings": None}), data.vocab_size, 3, data.pad_id)
    torch.manual_seed(0)
    model = build_model(tiny_cfg, data.vocab_size, 3, data.pad_id, data)
    changed = (model.embedding.weight != plain.embedding.weight).any(1)
    seen = {t for ids in data.splits["train"]["input_ids"] for t in ids} - set(data.tokenizer.all_special_ids)
    assert set(torch.nonzero(changed).flatten().tolist()) == seen
    # the rest of the model is initialised exactly as without it
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        if name != "embedding.weight":
            assert torch.equal(a, b), name


def test_zero_unseen_rows_zeroes_exactly_the_tokens_absent_from_the_texts():
    emb = torch.nn.Embedding(V, 8, padding_idx=0)
    before = emb.weight.detach().clone()
    n = zero_unseen_rows(emb, corpus())
    seen = [1, 2, 10, 11, 12, *range(20, 25), *range(30, 35)]  # specials count: they occur
    assert n == V - len(seen)
    unseen = [i for i in range(V) if i not in seen]
    assert torch.equal(emb.weight[unseen], torch.zeros(len(unseen), 8))
    assert torch.equal(emb.weight[seen], before[seen])


def test_unseen_embeddings_zero_stay_zero_through_training_and_load_without_data(tiny_cfg, tiny_tokenizer):
    from hybridlib.data import Collator, prepare_data

    tiny_cfg.unseen_embeddings = "zero"
    with pytest.raises(ConfigError, match="unseen_embeddings: zero needs the training split"):
        build_model(tiny_cfg, len(tiny_tokenizer), 3)
    data = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    model = build_model(tiny_cfg, data.vocab_size, 3, data.pad_id, data)
    seen = torch.zeros(data.vocab_size, dtype=torch.bool)
    for ids in data.splits["train"]["input_ids"]:
        seen[torch.tensor(ids)] = True
    zero = model.embedding.weight.eq(0).all(1)
    assert 0 < int((~seen).sum()) and torch.equal(zero, ~seen)
    # training steps (AdamW with weight decay) move the rows they use and leave the unseen ones at zero
    batch = Collator(data.pad_id)([data.splits["train"][i] for i in range(16)])
    before = model.embedding.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(model.embedding.weight[~seen], torch.zeros(int((~seen).sum()), tiny_cfg.embed_dim))
    used = batch["input_ids"][batch["attention_mask"]].unique()
    assert (model.embedding.weight[used] != before[used]).any(1).all()
    # a saved model is rebuilt without the training data
    assert build_model(for_loading(tiny_cfg), data.vocab_size, 3, data.pad_id).embedding.weight.shape[0] == data.vocab_size


def test_vectors_from_a_file_are_projected_to_embed_dim(tmp_path):
    rng = np.random.default_rng(0)
    mat = rng.standard_normal((V, 16)).astype(np.float32)
    np.save(tmp_path / "vecs.npy", mat)
    emb = torch.nn.Embedding(V, 4, padding_idx=0)
    load_pretrained_embeddings(emb, str(tmp_path / "vecs.npy"))
    expected = project(torch.from_numpy(mat), 4)
    assert torch.allclose(emb.weight[1:], expected[1:])
    assert torch.equal(emb.weight[0], torch.zeros(4))
    with pytest.raises(ConfigError, match="has 60 rows but the tokenizer has 61"):
        load_pretrained_embeddings(torch.nn.Embedding(V + 1, 4), str(tmp_path / "vecs.npy"))
    with pytest.raises(ConfigError, match="larger than the pretrained vectors"):
        load_pretrained_embeddings(torch.nn.Embedding(V, 32), str(tmp_path / "vecs.npy"))
    with pytest.raises(ConfigError, match="neither 'minilm', 'ppmi' nor an existing file"):
        load_pretrained_embeddings(emb, str(tmp_path / "missing.npy"))
