"""The CNN ∥ BiLSTM text classifier (drawn in the README).

Padding never reaches the pooled features: pad embeddings are zeroed, the backward LSTM reads each text
reversed in place (pads stay at the end, read after every real token), pooling masks pads, and the CNN pools
only windows that start inside the text.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from hybridlib.config import Config
from hybridlib.runtime import lstm_autocast, lstm_path

_LSTM_WEIGHTS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse the first ``lengths[i]`` steps of each sequence in ``x`` (B, T, ...), keep the rest."""
    T = x.size(1)
    steps = torch.arange(T, device=x.device).unsqueeze(0)  # (1, T)
    lens = lengths.unsqueeze(1)
    idx = torch.where(steps < lens, lens - 1 - steps, steps)  # (B, T)
    idx = idx.view(idx.size(0), T, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, idx)


class BiLSTMBranch(nn.Module):
    """Stacked bidirectional LSTM built from one-directional LSTMs ``fwd[i]``, ``bwd[i]``, so padding is never read
    first. Two paths over the same weights (:func:`hybridlib.runtime.lstm_path`): "padded" (CPU: ``bwd`` on each
    text reversed in place) and "packed" (CUDA: one cuDNN bidirectional call with ``fwd[i]``, ``bwd[i]`` as its
    directions), so checkpoints move between them unchanged."""

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
        self.out_dim = 2 * hidden
        self.path: str | None = None  # "padded" | "packed" forces one; None: lstm_path(device type)
        self._cudnn_layout: tuple | None = None  # (path, weight pointers) the weights were last packed for on CUDA

    def resolved_path(self, device_type: str) -> str:
        return self.path or lstm_path(device_type)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor,
                host_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features (B, 2H). ``host_lengths``: ``lengths`` on the CPU, if the caller has them (the packed
        path needs them there; without them it copies ``lengths``, which waits for the GPU)."""
        device_type = x.device.type
        path = self.resolved_path(device_type)
        if device_type == "cuda":
            self._use_cudnn_layout(path)
        if torch.is_autocast_enabled(device_type) and not lstm_autocast(
                device_type, torch.get_autocast_dtype(device_type)):
            with torch.autocast(device_type, enabled=False):
                x = self._packed(x.float(), lengths, host_lengths) if path == "packed" else self._padded(x.float(), lengths)
        else:
            x = self._packed(x, lengths, host_lengths) if path == "packed" else self._padded(x, lengths)
        m = mask.unsqueeze(-1)
        if self.pooling == "max":
            return x.masked_fill(~m, float("-inf")).amax(dim=1)
        return (x * m).sum(dim=1) / lengths.clamp(min=1).unsqueeze(1).to(x.dtype)

    def _padded(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        for i, (fwd, bwd) in enumerate(zip(self.fwd, self.bwd)):
            if i > 0:
                x = self.between(x)
            out_f, _ = fwd(x)
            out_b, _ = bwd(reverse_padded(x, lengths))
            x = torch.cat([out_f, reverse_padded(out_b, lengths)], dim=-1)
        return x

    def packed_weights(self) -> list[torch.Tensor]:
        """The weights in the order of a bidirectional ``nn.LSTM``'s ``_flat_weights``: per layer, the forward
        direction's (w_ih, w_hh, b_ih, b_hh), then the backward one's."""
        return [getattr(m, name) for f, b in zip(self.fwd, self.bwd) for m in (f, b) for name in _LSTM_WEIGHTS]

    def _packed(self, x: torch.Tensor, lengths: torch.Tensor, host_lengths: torch.Tensor | None) -> torch.Tensor:
        B, T = x.shape[:2]
        lens = (host_lengths if host_lengths is not None else lengths).to("cpu", torch.int64)
        # a text of no tokens (its mask all False) still reads one (zero) step; pooling masks it out, as on "padded"
        packed = pack_padded_sequence(x, lens.clamp(min=1), batch_first=True, enforce_sorted=False)
        layers, hidden = len(self.fwd), self.fwd[0].hidden_size
        h0 = x.new_zeros(2 * layers, B, hidden)
        out, _, _ = torch._VF.lstm(packed.data, packed.batch_sizes, (h0, h0), self.packed_weights(), True, layers,
                                   self.between.p, self.training, True)
        out = PackedSequence(out, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        return pad_packed_sequence(out, batch_first=True, total_length=T)[0]

    def _apply(self, fn, recurse=True):  # .to() / .cuda(): lay the weights out for cuDNN before DDP sees them
        out = super()._apply(fn, recurse)
        if self.fwd[0].weight_ih_l0.is_cuda:
            self._use_cudnn_layout(self.resolved_path("cuda"))
        return out

    def _use_cudnn_layout(self, path: str) -> None:
        """CUDA: keep the weights where cuDNN reads them without a copy: both directions of all layers in one
        block for "packed", each ``nn.LSTM``'s own block for "padded". A move (``.to``), a deep copy or an
        ``nn.LSTM.flatten_parameters()`` call changes the pointers, which are checked here at each call."""
        weights = self.packed_weights()
        key = (path, tuple(w.data_ptr() for w in weights))
        if key == self._cudnn_layout:
            return
        with torch.inference_mode(False):  # the new weight block must be a normal tensor, even when called for eval
            if path == "padded":
                for m in (*self.fwd, *self.bwd):
                    m.flatten_parameters()
            else:
                flatten_bidirectional(weights, self.fwd[0].input_size, self.fwd[0].hidden_size, len(self.fwd))
        self._cudnn_layout = (path, tuple(w.data_ptr() for w in weights))


def flatten_bidirectional(weights: list[torch.Tensor], input_size: int, hidden: int, layers: int) -> None:
    """Place ``weights`` (a bidirectional LSTM's, in ``_flat_weights`` order) in one cuDNN weight block, in place,
    as ``nn.LSTM.flatten_parameters`` does for its own; a no-op where cuDNN cannot take them (then each call copies)."""
    if not all(w.is_cuda and w.dtype == weights[0].dtype and torch.backends.cudnn.is_acceptable(w) for w in weights):
        return
    if len({w.data_ptr() for w in weights}) != len(weights) or not torch._use_cudnn_rnn_flatten_weight():
        return
    import torch.backends.cudnn.rnn as cudnn_rnn

    with torch.cuda.device_of(weights[0]), torch.no_grad():
        torch._cudnn_rnn_flatten_weight(weights, 4, input_size, cudnn_rnn.get_cudnn_mode("LSTM"), hidden, 0, layers,
                                        True, True)


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
        self.side_thread: SideThread | None = None  # set for inference on one CPU thread (see _side_by_side)
        # branch_aux_loss: one linear classifier per branch, used only by the training loss
        branches = {"lstm": self.lstm, "cnn": self.cnn}
        self.aux_heads = nn.ModuleDict(
            {name: nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(b.out_dim, num_classes))
             for name, b in branches.items() if b is not None}
            if cfg.branch_aux_loss > 0 and self.lstm is not None and self.cnn is not None else {}
        )

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(token vectors (B, T, E) with pads zeroed and word dropout applied, mask (B, T), lengths (B,))."""
        if attention_mask is None:
            attention_mask = input_ids.ne(self.pad_id)
        mask = attention_mask.bool()
        keep = mask.unsqueeze(-1).to(self.embedding.weight.dtype)
        if self.training and self.embed_dropout > 0:
            keep = F.dropout(keep, self.embed_dropout)  # word dropout: whole token vectors
        return self.embedding(input_ids) * keep, mask, mask.sum(dim=1)

    def branch_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        host_lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each branch's pooled features, {"lstm": (B, D1), "cnn": (B, D2)} (the branches in use, in concat order).
        ``host_lengths``: the texts' lengths on the CPU, if known (saves the packed LSTM path a GPU wait)."""
        x, mask, lengths = self.embed(input_ids, attention_mask)
        if self._side_by_side(x):
            cnn = self.side_thread.start(self.cnn, x, mask, lengths)
            return {"lstm": self.lstm(x, mask, lengths, host_lengths), "cnn": cnn()}
        parts = {}
        if self.lstm is not None:
            parts["lstm"] = self.lstm(x, mask, lengths, host_lengths)
        if self.cnn is not None:
            parts["cnn"] = self.cnn(x, mask, lengths)
        return parts

    def _side_by_side(self, x: torch.Tensor) -> bool:
        """Run the CNN on ``side_thread`` beside the BiLSTM? When it is set (Predictor does), for inference on a CPU
        where torch uses one thread and there is a second core (a call of a few texts would otherwise leave it idle)."""
        return (self.side_thread is not None and self.lstm is not None and self.cnn is not None
                and x.device.type == "cpu" and not torch.is_grad_enabled() and torch.get_num_threads() == 1
                and (os.cpu_count() or 1) > 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, with_aux: bool = False,
                host_lengths: torch.Tensor | None = None):
        """Logits (B, C); with ``with_aux``, (logits, {branch: logits of its auxiliary head}) ({} without them).
        ``host_lengths``: as in :meth:`branch_features`."""
        parts = self.branch_features(input_ids, attention_mask, host_lengths)
        logits = self.head(torch.cat(list(parts.values()), dim=-1))
        if not with_aux:
            return logits
        return logits, {name: head(parts[name]) for name, head in self.aux_heads.items()}


class SideThread:
    """A worker thread of one model that runs a function beside the caller (inference: the CNN beside the BiLSTM),
    started on first use. Not shared: a copy, an unpickled model or a forked child starts its own."""

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0

    def __reduce__(self):  # deepcopy, pickle: a new, unstarted one
        return SideThread, ()

    def start(self, fn: Callable[..., torch.Tensor], *args) -> Callable[[], torch.Tensor]:
        """Start ``fn(*args)`` (one torch thread, no autograd); returns a function that waits for its result."""
        if self._pool is None or self._pid != os.getpid():  # a forked child has no copy of the parent's thread
            self._pool, self._pid = ThreadPoolExecutor(1, thread_name_prefix="hybridlib-side"), os.getpid()
        return self._pool.submit(_one_thread_no_grad, fn, *args).result


def _one_thread_no_grad(fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    torch.set_num_threads(1)  # this thread's own OpenMP setting, as the caller's
    with torch.no_grad():
        return fn(*args)


def build_model(cfg: Config, vocab_size: int, num_classes: int, pad_id: int = 0) -> HybridClassifier:
    """The architecture of ``cfg`` (its model group), randomly initialised."""
    return HybridClassifier(cfg, vocab_size, num_classes, pad_id)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
