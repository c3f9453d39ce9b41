"""The CNN ∥ BiLSTM text classifier.

token ids → shared embedding → [BiLSTM → masked max/mean pooling] ∥ [multi-kernel CNN → ReLU →
masked max-over-time] → concat → dropout → MLP → logits.

Padding never reaches the pooled features: pad embeddings are zeroed, the backward LSTM reads
each sequence's real tokens reversed in place (pads stay at the end, so they are read after
every real token and change nothing that is pooled), pooling masks pad positions, and the CNN
only pools windows that start at or before ``max(length - k, 0)``. Packed sequences would do
the same for the LSTM but measured about 2x slower on CPU.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from hybridlib.config import Config
from hybridlib.errors import ConfigError

_side_thread: ThreadPoolExecutor | None = None  # runs the CNN branch beside the LSTM, see features()


def _side() -> ThreadPoolExecutor:
    global _side_thread
    if _side_thread is None:
        _side_thread = ThreadPoolExecutor(1, thread_name_prefix="hybridlib-cnn")
    return _side_thread


def _forget_side_thread() -> None:  # a forked child has no copy of the thread: start a new one there
    global _side_thread
    _side_thread = None


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_side_thread)


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse the first ``lengths[i]`` steps of each sequence in ``x`` (B, T, ...), keep the rest."""
    T = x.size(1)
    steps = torch.arange(T, device=x.device).unsqueeze(0)  # (1, T)
    lens = lengths.unsqueeze(1)
    idx = torch.where(steps < lens, lens - 1 - steps, steps)  # (B, T)
    idx = idx.view(idx.size(0), T, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, idx)


class BiLSTMBranch(nn.Module):
    """Stacked bidirectional LSTM built from one-directional LSTMs, so padding is never read first."""

    def __init__(self, input_dim: int, hidden: int, layers: int, pooling: str, dropout: float):
        super().__init__()
        self.pooling = pooling
        self.fwd = nn.ModuleList()
        self.bwd = nn.ModuleList()
        for i in range(layers):
            d_in = input_dim if i == 0 else 2 * hidden
            self.fwd.append(nn.LSTM(d_in, hidden, batch_first=True))
            self.bwd.append(nn.LSTM(d_in, hidden, batch_first=True))
        self.between = nn.Dropout(dropout)
        self.out_dim = 2 * hidden * (2 if pooling == "both" else 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        for i, (fwd, bwd) in enumerate(zip(self.fwd, self.bwd)):
            if i > 0:
                x = self.between(x)
            out_f, _ = fwd(x)
            out_b, _ = bwd(reverse_padded(x, lengths))
            x = torch.cat([out_f, reverse_padded(out_b, lengths)], dim=-1)
        m = mask.unsqueeze(-1)
        pooled = []
        if self.pooling in ("max", "both"):
            pooled.append(x.masked_fill(~m, float("-inf")).amax(dim=1))
        if self.pooling in ("mean", "both"):
            pooled.append((x * m).sum(dim=1) / lengths.clamp(min=1).unsqueeze(1).to(x.dtype))
        return torch.cat(pooled, dim=-1)


class CNNBranch(nn.Module):
    """Parallel 1D convolutions of several widths, ReLU, max over the valid positions."""

    def __init__(self, input_dim: int, kernel_sizes: list[int], filters: int):
        super().__init__()
        self.kernel_sizes = list(kernel_sizes)
        self.convs = nn.ModuleList(nn.Conv1d(input_dim, filters, k) for k in self.kernel_sizes)
        self.out_dim = filters * len(self.kernel_sizes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        kmax = max(self.kernel_sizes)
        if x.size(1) < kmax:  # inputs shorter than the widest kernel: zero-pad to fit it
            x = F.pad(x, (0, 0, 0, kmax - x.size(1)))
        h = x.transpose(1, 2)  # (B, E, T)
        feats = []
        for k, conv in zip(self.kernel_sizes, self.convs):
            c = conv(h)  # (B, F, T-k+1)
            pos = torch.arange(c.size(2), device=c.device).unsqueeze(0)
            valid = pos <= (lengths - k).clamp(min=0).unsqueeze(1)  # windows that start inside the text
            feats.append(F.relu(c.masked_fill(~valid.unsqueeze(1), float("-inf")).amax(dim=2)))
        return torch.cat(feats, dim=-1)


class HybridClassifier(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int, num_classes: int, pad_id: int = 0):
        super().__init__()
        self.pad_id = pad_id
        self.embedding = nn.Embedding(vocab_size, cfg.embed_dim, padding_idx=pad_id)
        self.embed_dropout = cfg.embed_dropout
        self.lstm = (
            BiLSTMBranch(cfg.embed_dim, cfg.lstm_hidden, cfg.lstm_layers, cfg.lstm_pooling, cfg.dropout)
            if "lstm" in cfg.branches
            else None
        )
        self.cnn = CNNBranch(cfg.embed_dim, cfg.cnn_kernel_sizes, cfg.cnn_filters) if "cnn" in cfg.branches else None
        feat_dim = (self.lstm.out_dim if self.lstm else 0) + (self.cnn.out_dim if self.cnn else 0)
        self.lstm_norm = nn.LayerNorm(self.lstm.out_dim) if cfg.branch_norm and self.lstm else nn.Identity()
        self.cnn_norm = nn.LayerNorm(self.cnn.out_dim) if cfg.branch_norm and self.cnn else nn.Identity()
        if cfg.mlp_hidden > 0:
            self.head = nn.Sequential(
                nn.Dropout(cfg.dropout),
                nn.Linear(feat_dim, cfg.mlp_hidden),
                nn.ReLU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(cfg.mlp_hidden, num_classes),
            )
        else:
            self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(feat_dim, num_classes))
        # branch_aux_loss: one linear classifier per branch, used only by the training loss
        branches = {"lstm": self.lstm, "cnn": self.cnn}
        self.aux_heads = nn.ModuleDict(
            {name: nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(b.out_dim, num_classes))
             for name, b in branches.items() if b is not None}
            if cfg.branch_aux_loss > 0 and self.lstm is not None and self.cnn is not None else {}
        )

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The concatenated pooled branch features (before dropout and the MLP)."""
        return torch.cat(list(self.branch_features(input_ids, attention_mask).values()), dim=-1)

    def branch_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each branch's pooled features, {"lstm": (B, D1), "cnn": (B, D2)} (the branches in use, in concat order)."""
        if attention_mask is None:
            attention_mask = input_ids.ne(self.pad_id)
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1)
        keep = mask.unsqueeze(-1).to(self.embedding.weight.dtype)
        if self.training and self.embed_dropout > 0:
            # word-level dropout: drop whole token vectors (cheaper than per element, regularises more)
            keep = F.dropout(keep, self.embed_dropout)
        x = self.embedding(input_ids) * keep

        def cnn() -> torch.Tensor:
            return self.cnn_norm(self.cnn(x, mask, lengths))

        cnn_beside = None
        if self.lstm is not None and self.cnn is not None and self._cnn_beside_lstm(x):
            # Inference on one CPU thread (Predictor on a few texts) leaves the other cores idle: run the
            # CNN branch on a second thread meanwhile. Same numbers; one IMDB review's predict latency
            # p50 10.0 -> 7.4 ms on 2 idle cores, unchanged when the cores are busy.
            inference = torch.is_inference_mode_enabled()

            def cnn_on_side_thread() -> torch.Tensor:
                torch.set_num_threads(1)  # this thread's own OpenMP setting, as the caller's
                with torch.no_grad(), torch.inference_mode(inference):
                    return cnn()

            cnn_beside = _side().submit(cnn_on_side_thread)
        parts = {}
        if self.lstm is not None:
            parts["lstm"] = self.lstm_norm(self.lstm(x, mask, lengths))
        if self.cnn is not None:
            parts["cnn"] = cnn_beside.result() if cnn_beside is not None else cnn()
        return parts

    @staticmethod
    def _cnn_beside_lstm(x: torch.Tensor) -> bool:
        """Run the branches concurrently? Only without autograd, on a CPU, when torch uses one thread
        and there is a second core; not under torch.distributed, whose ranks already share the cores."""
        return (
            not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and torch.get_num_threads() == 1
            and (os.cpu_count() or 1) > 1
            and not (torch.distributed.is_available() and torch.distributed.is_initialized())
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, with_aux: bool = False):
        """Logits (B, C); with ``with_aux``, (logits, {branch: logits of its auxiliary head}) ({} without them)."""
        parts = self.branch_features(input_ids, attention_mask)
        logits = self.head(torch.cat(list(parts.values()), dim=-1))
        if not with_aux:
            return logits
        return logits, {name: head(parts[name]) for name, head in self.aux_heads.items()}


def build_model(cfg: Config, vocab_size: int, num_classes: int, pad_id: int = 0, data=None) -> HybridClassifier:
    """The model of ``cfg``; ``data`` (a hybridlib.data.Data) is needed only by ``pretrained_embeddings: ppmi``
    and ``unseen_embeddings: zero``, which read the training split."""
    model = HybridClassifier(cfg, vocab_size, num_classes, pad_id)
    if cfg.pretrained_embeddings == "ppmi":
        from hybridlib.embeddings import init_from_training_texts

        if data is None:
            raise ConfigError("pretrained_embeddings: ppmi is computed from the training split: pass data= to build_model.")
        init_from_training_texts(model.embedding, data.splits["train"]["input_ids"],
                                 skip=data.tokenizer.all_special_ids, seed=cfg.seed)
    elif cfg.pretrained_embeddings:
        from hybridlib.embeddings import load_pretrained_embeddings

        load_pretrained_embeddings(model.embedding, cfg.pretrained_embeddings)
    if cfg.unseen_embeddings == "zero":
        from hybridlib.embeddings import zero_unseen_rows

        if data is None:
            raise ConfigError("unseen_embeddings: zero needs the training split to know which tokens it has: pass data= to build_model.")
        zero_unseen_rows(model.embedding, data.splits["train"]["input_ids"])
    model.embedding.weight.requires_grad_(not cfg.freeze_embeddings)
    return model


def for_loading(cfg: Config) -> Config:
    """``cfg`` without the initialisations that read data or files: the weights will come from a checkpoint."""
    return dataclasses.replace(cfg, pretrained_embeddings=None, unseen_embeddings="random")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
