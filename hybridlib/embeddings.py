"""Optional: initialise the embedding from word vectors of the tokenizer's vocabulary.

``pretrained_embeddings`` names a ``.pt``/``.npy``/``.safetensors`` matrix (row i: token id i). When
``embed_dim`` is smaller than the vectors, they are projected onto their top ``embed_dim`` principal
components.

``pretrained_embeddings: ppmi`` needs no outside data: word vectors are computed from the run's
own training split (tokenized, as the model reads it) by factorising its positive pointwise mutual
information matrix (:func:`ppmi_vectors`), before training starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.torch import load_file
from sklearn.utils.extmath import randomized_svd

from hybridlib.errors import ConfigError
from hybridlib.locations import embeddings_file


def read_vectors(source: str) -> torch.Tensor:
    """The matrix in the file ``source``, as float32 (vocab x dim)."""
    path = embeddings_file(source)
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path)).float()
    if path.suffix == ".safetensors":
        tensors = load_file(str(path))
        return next(iter(tensors.values())).float()
    return torch.load(path, map_location="cpu", weights_only=True).float()


def project(vectors: torch.Tensor, dim: int) -> torch.Tensor:
    """Keep ``dim`` columns: the vectors themselves, or their top principal components (same scale)."""
    if vectors.shape[1] == dim:
        return vectors
    if vectors.shape[1] < dim:
        raise ConfigError(f"embed_dim={dim} is larger than the pretrained vectors ({vectors.shape[1]}); lower embed_dim.")
    centered = vectors - vectors.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centered, full_matrices=False)
    out = centered @ v[:dim].T
    return out * (vectors.std() / out.std())


def cooccurrences(token_ids: Iterable[Sequence[int]], vocab_size: int, skip: Iterable[int] = (), window: int = 5,
                  chunk_tokens: int = 1 << 21):
    """Symmetric sparse (vocab, vocab) counts of token pairs up to ``window`` apart, weighted 1/distance;
    pairs never span two texts, and tokens in ``skip`` are left out (their neighbours stay apart).

    Reads ``token_ids`` (any iterable of texts) about ``chunk_tokens`` tokens at a time and keeps exact integer
    counts per distance, so memory is bounded by the counts, not the corpus. A pair seen k times at distance d
    weighs k sequential additions of 1/d: the float values of summing every pair at once, bit for bit."""
    skip = np.asarray(sorted(set(skip)), dtype=np.int32)
    gap = np.full(window, -1, dtype=np.int32)  # between texts: no pair reaches across
    shape = (vocab_size, vocab_size)
    seen = [sp.csr_matrix(shape, dtype=np.int64) for _ in range(window)]  # how often each pair, per distance
    for chunk in _chunks(token_ids, chunk_tokens):
        ids = np.concatenate([x for s in chunk for x in (s, gap)])
        ids[np.isin(ids, skip)] = -1
        for d in range(1, window + 1):
            a, b = ids[:-d], ids[d:]
            ok = (a >= 0) & (b >= 0)
            seen[d - 1] = seen[d - 1] + sp.csr_matrix((np.ones(ok.sum(), dtype=np.int64), (a[ok], b[ok])), shape=shape)
    counts = sp.csr_matrix(shape)
    for d in range(1, window + 1):
        n = seen.pop(0)
        sums = np.cumsum(np.full(n.data.max(initial=0), 1.0 / d))  # sums[k - 1]: 1/d added k times, in order
        pairs = sp.csr_matrix((sums[n.data - 1], n.indices, n.indptr), shape=shape)
        counts = counts + pairs + pairs.T
    return counts


def _chunks(token_ids: Iterable[Sequence[int]], size: int) -> Iterator[list[np.ndarray]]:
    """Whole texts as int32 arrays, in lists of about ``size`` tokens."""
    chunk, n = [], 0
    for s in token_ids:
        chunk.append(np.asarray(s, dtype=np.int32))
        n += len(chunk[-1])
        if n >= size:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def ppmi_vectors(token_ids: Sequence[Sequence[int]], vocab_size: int, dim: int, skip: Iterable[int] = (),
                 seed: int = 0, svd_device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Word vectors from co-occurrences in ``token_ids``: (vectors (vocab, dim), mask of the tokens seen).

    Counts pairs up to 5 tokens apart (:func:`cooccurrences`: weight 1/distance, never across texts, ignoring
    ``skip``: special tokens), takes the positive PMI with context-distribution smoothing (alpha 0.75), and keeps
    the top ``dim`` singular directions, U * sqrt(S): the settings of Levy, Goldberg & Dagan (2015),
    where this matches word2vec. Seen rows are scaled to std 1, like nn.Embedding's initialisation.
    ``svd_device``: None factorises with scikit-learn's randomized SVD on the CPU; a torch device with
    :func:`torch_top_singular` there (what CUDA runs use).
    """
    counts = cooccurrences(token_ids, vocab_size, skip)
    c = counts.tocoo()
    word = np.asarray(counts.sum(1)).ravel()
    context = np.asarray(counts.sum(0)).ravel() ** 0.75
    pmi = np.log(c.data * context.sum() / (word[c.row] * context[c.col]))
    pos = pmi > 0
    ppmi = sp.csr_matrix((pmi[pos], (c.row[pos], c.col[pos])), shape=(vocab_size, vocab_size))
    seen = word > 0
    if ppmi.nnz == 0 or dim >= min(ppmi.shape):
        raise ConfigError(
            f"pretrained_embeddings: ppmi needs training texts with co-occurring tokens and embed_dim ({dim}) "
            f"below the vocabulary size ({vocab_size}); got {ppmi.nnz} positive co-occurrences."
        )
    if svd_device is None:
        u, s, _ = randomized_svd(ppmi, dim, random_state=seed)
    else:
        u, s = torch_top_singular(ppmi, dim, seed, svd_device)
    vectors = u * np.sqrt(s)
    return vectors / max(vectors[seen].std(), 1e-12), seen


def torch_top_singular(matrix: sp.spmatrix, k: int, seed: int, device: torch.device | str) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` left singular vectors and values of a sparse matrix, by ``torch.svd_lowrank`` on ``device``
    in float32: a 2k-column sketch (float32 with scikit-learn's k + 10 was less exact) and 7 power iterations.
    torch's global RNG is left as it was."""
    device = torch.device(device)
    coo = matrix.tocoo()
    a = torch.sparse_coo_tensor(np.vstack([coo.row, coo.col]), coo.data.astype(np.float32), coo.shape,
                                device=device, check_invariants=False)  # a COO from scipy: valid by construction
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        u, s, _ = torch.svd_lowrank(a, q=min(2 * k, *matrix.shape), niter=7)
    return u[:, :k].cpu().double().numpy(), s[:k].cpu().double().numpy()


def init_from_training_texts(embedding: torch.nn.Embedding, token_ids: Sequence[Sequence[int]], skip: Iterable[int],
                             seed: int = 0, svd_device: torch.device | str | None = None) -> int:
    """Overwrite the rows of tokens seen in ``token_ids`` with their PPMI vectors; return how many."""
    vectors, seen = ppmi_vectors(token_ids, embedding.num_embeddings, embedding.embedding_dim, skip, seed=seed,
                                 svd_device=svd_device)
    with torch.no_grad():
        rows = torch.from_numpy(np.flatnonzero(seen))
        embedding.weight[rows] = torch.from_numpy(vectors[seen]).to(embedding.weight.dtype)
        if embedding.padding_idx is not None:
            embedding.weight[embedding.padding_idx].zero_()
    return int(seen.sum())


def load_pretrained_embeddings(embedding: torch.nn.Embedding, source: str) -> None:
    vectors = read_vectors(source)
    if vectors.shape[0] != embedding.num_embeddings:
        raise ConfigError(
            f"pretrained_embeddings {source!r} has {vectors.shape[0]} rows but the tokenizer has "
            f"{embedding.num_embeddings} tokens; use vectors of the same vocabulary."
        )
    with torch.no_grad():
        embedding.weight.copy_(project(vectors, embedding.embedding_dim))
        if embedding.padding_idx is not None:
            embedding.weight[embedding.padding_idx].zero_()


def initialise_embedding(embedding: torch.nn.Embedding, source: str, train_token_ids: Sequence[Sequence[int]] | None = None,
                         skip: Iterable[int] = (), seed: int = 0, svd_device: torch.device | str | None = None) -> None:
    """Initialise ``embedding`` from ``source`` (the ``pretrained_embeddings`` param): 'ppmi' needs the training
    split's token ids (``skip``: the special tokens; ``svd_device``: see :func:`ppmi_vectors`), anything else
    names pretrained vectors."""
    if source == "ppmi":
        if train_token_ids is None:
            raise ConfigError("pretrained_embeddings: ppmi is computed from the training split: pass its token ids.")
        init_from_training_texts(embedding, train_token_ids, skip=skip, seed=seed, svd_device=svd_device)
    else:
        load_pretrained_embeddings(embedding, source)
