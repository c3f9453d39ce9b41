"""hybridlib.embeddings: PPMI vectors from the training split, matrices from files, the vocabulary check."""

from __future__ import annotations

from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from hybridlib.config import Config
from hybridlib.embeddings import (
    cooccurrences,
    init_from_training_texts,
    initialise_embedding,
    load_pretrained_embeddings,
    ppmi_vectors,
    project,
    torch_top_singular,
)
from hybridlib.errors import ConfigError
from hybridlib.model import build_model
from hybridlib.training import init_model, make_optimization

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


def test_ppmi_vectors_by_torch_svd_match_scikit_learns():
    """svd_device (CUDA runs) factorises with torch.svd_lowrank: here on the CPU, against the exact SVD."""
    rng = np.random.default_rng(0)
    texts = [list(np.minimum(rng.zipf(1.3, 30), 799)) for _ in range(1500)]
    ppmi = cooccurrences(texts, 800).tocsr()
    ppmi.data = np.log1p(ppmi.data)
    exact = np.linalg.svd(ppmi.toarray())
    u, s = torch_top_singular(ppmi, 16, seed=0, device="cpu")
    np.testing.assert_allclose(s, exact.S[:16], rtol=1e-3)
    np.testing.assert_allclose(np.abs((u * exact.U[:, :16]).sum(0)), 1.0, atol=1e-2)  # the same vectors, up to sign
    state = torch.get_rng_state()
    vec, seen = ppmi_vectors(corpus(), V, dim=8, skip=[1, 2], svd_device="cpu")
    assert torch.equal(torch.get_rng_state(), state)  # the training's random stream is not moved
    assert cos(vec[10], vec[11]) > cos(vec[10], vec[12]) + 0.5
    ref, ref_seen = ppmi_vectors(corpus(), V, dim=8, skip=[1, 2])
    assert np.array_equal(seen, ref_seen) and vec[seen].std() == pytest.approx(1.0)
    gram = lambda x: x[seen] @ x[seen].T  # noqa: E731  (sign-free comparison)
    np.testing.assert_allclose(gram(vec), gram(ref), atol=1e-3 * np.abs(gram(ref)).max())


def test_cooccurrences_are_weighted_by_distance_and_never_span_two_texts():
    counts = cooccurrences([[5, 7, 8], [6, 9], [1, 7, 1, 8]], 12, skip=[1], window=2).toarray()
    assert counts[5, 7] == counts[7, 5] == 1.0 and counts[5, 8] == 0.5
    assert counts[8, 6] == 0 and counts[5, 6] == 0  # 8 ends one text, 6 starts the next
    assert counts[6, 9] == 1.0
    assert counts[7, 8] == 1.0 + 0.5  # side by side in text 1; two apart in text 3 (the skipped [1] between)
    assert counts[1].sum() == 0


def one_shot_cooccurrences(token_ids, vocab_size, skip=(), window=5):
    """The former whole-corpus cooccurrences: one concatenated array, one float CSR per distance (scipy sums the
    duplicates of a pair in order), folded as counts + P_d + P_d.T."""
    gap = np.full(window, -1)
    ids = np.concatenate([x for s in token_ids for x in (np.asarray(s, dtype=np.int64), gap)] or [gap])
    ids[np.isin(ids, list(skip))] = -1
    counts = sp.csr_matrix((vocab_size, vocab_size))
    for d in range(1, window + 1):
        a, b = ids[:-d], ids[d:]
        ok = (a >= 0) & (b >= 0)
        pairs = sp.csr_matrix((np.full(ok.sum(), 1.0 / d), (a[ok], b[ok])), shape=(vocab_size, vocab_size))
        counts = counts + pairs + pairs.T
    return counts


@pytest.mark.parametrize("chunk_tokens", [1, 50, 1 << 22])
def test_chunked_cooccurrences_equal_the_one_shot_sums_bit_for_bit(chunk_tokens):
    rng = np.random.default_rng(7)
    texts = [rng.zipf(1.3, rng.integers(0, 300)) % V for _ in range(300)] + [[]]  # frequent pairs: long sums
    ref = one_shot_cooccurrences(texts, V, skip=[1, 2])
    got = cooccurrences(iter(texts), V, skip=[1, 2], chunk_tokens=chunk_tokens)
    assert ref.data.max() > 100  # sums long enough for their rounding to depend on the order
    for attr in ("indptr", "indices", "data"):
        assert getattr(got, attr).tobytes() == getattr(ref, attr).tobytes()


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


def fake_data(vocab_size: int = V, train_ids: list[list[int]] | None = None) -> SimpleNamespace:
    """What init_model reads of a hybridlib.data.Data: sizes, labels, pad id, special ids, the training token ids."""
    tok = SimpleNamespace(all_special_ids=[0, 1, 2])
    return SimpleNamespace(vocab_size=vocab_size, label_names=["a", "b", "c"], pad_id=0, tokenizer=tok,
                           splits={"train": datasets.Dataset.from_dict(
                               {"input_ids": corpus() if train_ids is None else train_ids},
                               features=datasets.Features({"input_ids": datasets.List(datasets.Value("int64"))}))})


def small_cfg(**overrides) -> Config:
    return Config(**{"embed_dim": 8, "lstm_hidden": 4, "cnn_filters": 3, "mlp_hidden": 5, "seed": 3, **overrides})


def test_ppmi_through_init_model_changes_the_seen_rows_only():
    """init_model: the same seed gives the same weights; ppmi then overwrites exactly the rows of the tokens in the
    training split (specials skipped) and leaves every other parameter as without it."""
    data = fake_data()
    plain = init_model(small_cfg(), data, torch.device("cpu"))
    again = init_model(small_cfg(), data, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), again.state_dict().values()))
    model = init_model(small_cfg(pretrained_embeddings="ppmi"), data, torch.device("cpu"))
    changed = (model.embedding.weight != plain.embedding.weight).any(1)
    assert set(torch.nonzero(changed).flatten().tolist()) == {10, 11, 12, *range(20, 25), *range(30, 35)}
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        if name != "embedding.weight":
            assert torch.equal(a, b), name
    w = model.embedding.weight.detach().numpy()
    assert cos(w[10], w[11]) > cos(w[10], w[12]) + 0.5  # the PPMI geometry survived
    # resuming: the weights come from last.pt, the training split is not read
    skipped = init_model(small_cfg(pretrained_embeddings="ppmi"), fake_data(train_ids=[]), torch.device("cpu"),
                         pretrained=False)
    assert torch.equal(skipped.embedding.weight, plain.embedding.weight)


def test_ppmi_needs_the_training_token_ids():
    with pytest.raises(ConfigError, match="ppmi is computed from the training split"):
        initialise_embedding(torch.nn.Embedding(V, 8), "ppmi")


def test_vectors_from_a_file_through_init_model(tmp_path):
    """pretrained_embeddings: a .npy/.pt file of the vocabulary's vectors (init_model reads it; build_model only
    builds the architecture); every parameter trains."""
    mat = np.random.default_rng(1).standard_normal((V, 8)).astype(np.float32)
    np.save(tmp_path / "vecs.npy", mat)
    torch.save(torch.from_numpy(mat), tmp_path / "vecs.pt")
    for path in (tmp_path / "vecs.npy", tmp_path / "vecs.pt"):
        cfg = small_cfg(pretrained_embeddings=str(path))
        model = init_model(cfg, fake_data(), torch.device("cpu"))
        assert torch.allclose(model.embedding.weight[1:], torch.from_numpy(mat[1:]))
        assert torch.equal(model.embedding.weight[0], torch.zeros(8))  # the pad row stays zero
        assert not torch.equal(build_model(cfg, V, 3).embedding.weight[1:], model.embedding.weight[1:])
        params = make_optimization(model, cfg, 10, None)[0].param_groups[0]["params"]
        assert [id(p) for p in params] == [id(p) for p in model.parameters()] and all(p.requires_grad for p in params)


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
    with pytest.raises(ConfigError, match="neither 'ppmi' nor an existing file"):
        load_pretrained_embeddings(emb, str(tmp_path / "missing.npy"))
