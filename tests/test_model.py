"""hybridlib.model: padding never changes the pooled features; shapes; short inputs; branches."""

from __future__ import annotations

import itertools

import pytest
import torch

from hybridlib.config import Config
from hybridlib.model import BiLSTMBranch, CNNBranch, HybridClassifier, build_model, count_parameters, reverse_padded

VOCAB, CLASSES = 40, 3
ATOL = 1e-5


def tiny_config(**overrides) -> Config:
    values = dict(
        embed_dim=8,
        lstm_hidden=6,
        cnn_filters=5,
        cnn_kernel_sizes=[3, 4, 5],
        mlp_hidden=7,
        dropout=0.3,
        embed_dropout=0.2,
    )
    values.update(overrides)
    return Config(**values)


def cpu_loop(model: HybridClassifier, cfg: Config, optimizer=None):
    """A training Loop on the CPU in fp32: ``optimizer`` (default: the project's AdamW), a constant lr, no scaler."""
    from hybridlib.training import make_optimization
    from hybridlib.trainstate import Loop

    optimizer = optimizer or make_optimization(model, cfg, 1, None)[0]
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return Loop(cfg, model, model, torch.device("cpu"), None, None, optimizer, sched, torch.amp.GradScaler(enabled=False))


def make_model(pad_id: int = 0, seed: int = 0, **overrides) -> HybridClassifier:
    torch.manual_seed(seed)
    model = build_model(tiny_config(**overrides), VOCAB, CLASSES, pad_id=pad_id)
    with torch.no_grad():  # make the pad row non-zero: masking, not padding_idx, must keep pads out
        model.embedding.weight[pad_id].normal_()
    return model.eval()


def random_ids(length: int, pad_id: int = 0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (length,), generator=g)
    ids[ids == pad_id] = (pad_id + 1) % VOCAB
    return ids


def pad_batch(seqs: list[torch.Tensor], pad_id: int = 0, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs) + extra
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    return ids, ids.ne(pad_id)


MODEL_VARIANTS = [
    dict(branches=branches, lstm_pooling=pooling, lstm_layers=layers)
    for branches, pooling, layers in itertools.product([["cnn"], ["lstm"], ["cnn", "lstm"]], ["max", "mean"], [1, 2])
    if not (branches == ["cnn"] and (pooling != "max" or layers != 1))  # LSTM settings do not matter for cnn only
] + [dict(branches=["cnn", "lstm"], lstm_pooling="mean", lstm_layers=2, branch_aux_loss=0.5)]


def features(model: HybridClassifier, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The concatenated pooled branch features (what the joint head reads)."""
    return torch.cat(list(model.branch_features(ids, mask).values()), dim=-1)


def variant_id(v):
    return "+".join(v["branches"]) + f"-{v['lstm_pooling']}-L{v['lstm_layers']}" + ("-aux" if v.get("branch_aux_loss") else "")


@pytest.mark.parametrize("variant", MODEL_VARIANTS, ids=variant_id)
@pytest.mark.parametrize("length", [1, 2, 4, 9])
def test_features_unchanged_by_extra_padding(variant, length):
    model = make_model(**variant)
    seq = random_ids(length, seed=length)
    with torch.no_grad():
        ids, mask = pad_batch([seq])
        ref = features(model, ids, mask)
        assert torch.isfinite(ref).all()
        for extra in (1, 3, 17):
            ids_p, mask_p = pad_batch([seq], extra=extra)
            assert ids_p.shape[1] == length + extra
            torch.testing.assert_close(features(model, ids_p, mask_p), ref, atol=ATOL, rtol=0)
            torch.testing.assert_close(features(model, ids_p), ref, atol=ATOL, rtol=0)  # mask derived from pad_id
            torch.testing.assert_close(model(ids_p, mask_p), model(ids, mask), atol=ATOL, rtol=0)


@pytest.mark.parametrize("pad_id", [1, 7])
def test_features_unchanged_by_padding_nonzero_pad_id(pad_id):
    model = make_model(pad_id=pad_id, branches=["cnn", "lstm"], lstm_pooling="mean", lstm_layers=2)
    seq = random_ids(6, pad_id=pad_id, seed=1)
    with torch.no_grad():
        ref = features(model, *pad_batch([seq], pad_id=pad_id))
        got = features(model, *pad_batch([seq], pad_id=pad_id, extra=5))
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", MODEL_VARIANTS, ids=variant_id)
def test_mixed_length_batch_matches_rows_alone(variant):
    model = make_model(**variant)
    seqs = [random_ids(n, seed=10 + n) for n in (1, 2, 3, 5, 8, 13, 21)]
    with torch.no_grad():
        ids, mask = pad_batch(seqs)
        batch_logits = model(ids, mask)
        batch_feats = features(model, ids, mask)
        for i, s in enumerate(seqs):
            alone = pad_batch([s])
            torch.testing.assert_close(batch_feats[i : i + 1], features(model, *alone), atol=ATOL, rtol=0)
            torch.testing.assert_close(batch_logits[i : i + 1], model(*alone), atol=ATOL, rtol=0)


@pytest.mark.parametrize("branches", [["cnn"], ["lstm"], ["cnn", "lstm"]])
@pytest.mark.parametrize("length", [1, 2])
def test_inputs_shorter_than_the_widest_kernel(branches, length):
    model = make_model(branches=branches, cnn_kernel_sizes=[3, 4, 5])
    ids, mask = pad_batch([random_ids(length, seed=2), random_ids(1, seed=3)])
    with torch.no_grad():
        logits = model(ids, mask)
        feats = features(model, ids, mask)
    assert logits.shape == (2, CLASSES)
    assert torch.isfinite(logits).all() and torch.isfinite(feats).all()
    # also in training mode, with gradients
    model.train()
    out = model(ids, mask)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_cnn_short_input_equals_explicit_zero_padding():
    """A length-2 text gives the same CNN features whether T=2 (padded inside) or T=10 (padded outside)."""
    torch.manual_seed(0)
    cnn = CNNBranch(4, [3, 4, 5], 3).eval()
    x = torch.randn(1, 2, 4)
    lengths = torch.tensor([2])
    mask = torch.ones(1, 2, dtype=torch.bool)
    x10 = torch.cat([x, torch.zeros(1, 8, 4)], dim=1)
    mask10 = torch.cat([mask, torch.zeros(1, 8, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(cnn(x, mask, lengths), cnn(x10, mask10, lengths), atol=ATOL, rtol=0)


def test_cnn_pools_only_windows_inside_the_text():
    torch.manual_seed(0)
    cnn = CNNBranch(2, [2], 1).eval()
    with torch.no_grad():
        cnn.convs[0].weight.fill_(1.0)
        cnn.convs[0].bias.zero_()
    # text of 3 steps with value 1, followed by garbage (not zeroed) in pad positions: must be ignored
    x = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [100.0, 100.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, True, False, False]])
    out = cnn(x, mask, mask.sum(1))
    assert out.item() == pytest.approx(4.0)  # a window of 2 steps x 2 channels x 1.0


def test_lstm_backward_direction_reads_the_text_reversed():
    torch.manual_seed(0)
    lstm = BiLSTMBranch(3, 4, 1, "max", 0.0).eval()
    x = torch.randn(1, 5, 3)
    mask = torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        out = lstm(x, mask, mask.sum(1))
        f, _ = lstm.fwd[0](x)
        b, _ = lstm.bwd[0](x.flip(1))
        expect = torch.cat([f, b.flip(1)], dim=-1).amax(dim=1)
    torch.testing.assert_close(out, expect, atol=ATOL, rtol=0)


def reverse_reference(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    out = x.clone()
    for i, n in enumerate(lengths):
        out[i, :n] = x[i, :n].flip(0)
    return out


@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 3), (4, 6, 2, 2)])
def test_reverse_padded(shape):
    x = torch.arange(torch.tensor(shape).prod().item(), dtype=torch.float32).view(*shape)
    lengths = [6, 3, 1, 0]
    out = reverse_padded(x, torch.tensor(lengths))
    assert torch.equal(out, reverse_reference(x, lengths))
    # the first row (full length) is fully reversed; pads of the others keep their place
    assert torch.equal(out[0], x[0].flip(0))
    assert torch.equal(out[1, 3:], x[1, 3:])
    assert torch.equal(out[3], x[3])
    # reversing twice gives back the input
    assert torch.equal(reverse_padded(out, torch.tensor(lengths)), x)


def test_reverse_padded_example():
    x = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]]).unsqueeze(-1)
    out = reverse_padded(x, torch.tensor([3, 5])).squeeze(-1)
    assert out.tolist() == [[3, 2, 1, 0, 0], [8, 7, 6, 5, 4]]


@pytest.mark.parametrize("mlp_hidden", [0, 7])
@pytest.mark.parametrize("branches", [["cnn"], ["lstm"], ["cnn", "lstm"]])
def test_output_shape_and_parameters(branches, mlp_hidden):
    model = make_model(branches=branches, mlp_hidden=mlp_hidden)
    ids, mask = pad_batch([random_ids(n, seed=n) for n in (3, 7, 11)])
    with torch.no_grad():
        assert model(ids, mask).shape == (3, CLASSES)
    assert count_parameters(model) > 0
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert (model.lstm is not None) == ("lstm" in branches)
    assert (model.cnn is not None) == ("cnn" in branches)


def test_feature_sizes():
    ids, mask = pad_batch([random_ids(5)])
    for pooling in ("max", "mean"):
        m = make_model(branches=["cnn", "lstm"], lstm_pooling=pooling, lstm_hidden=6, cnn_filters=5, cnn_kernel_sizes=[2, 3])
        with torch.no_grad():
            parts = m.branch_features(ids, mask)
            assert list(parts) == ["lstm", "cnn"]  # the concat order
            assert parts["lstm"].shape == (1, 2 * 6) and parts["cnn"].shape == (1, 5 * 2)
            assert torch.equal(m.head(torch.cat(list(parts.values()), dim=-1)), m(ids, mask))
    m = make_model(branches=["lstm"], lstm_pooling="max", lstm_hidden=6)
    with torch.no_grad():
        assert features(m, ids, mask).shape == (1, 12)
    m = make_model(branches=["cnn"], cnn_filters=5, cnn_kernel_sizes=[3, 4, 5])
    with torch.no_grad():
        assert features(m, ids, mask).shape == (1, 15)


def test_count_parameters_counts_frozen_ones_too():
    """The model's size (metrics.json num_parameters): frozen embeddings included, as a rebuilt model has them."""
    model = make_model()
    total = count_parameters(model)
    model.embedding.weight.requires_grad_(False)
    assert count_parameters(model) == total == sum(p.numel() for p in model.parameters())


def test_eval_is_deterministic_and_train_mode_uses_dropout():
    model = make_model(branches=["cnn", "lstm"], dropout=0.5, embed_dropout=0.5)
    ids, mask = pad_batch([random_ids(12, seed=n) for n in range(4)])
    with torch.no_grad():
        assert torch.equal(model(ids, mask), model(ids, mask))
        model.train()
        torch.manual_seed(1)
        a = model(ids, mask)
        b = model(ids, mask)
    assert not torch.equal(a, b)


def test_model_learns_a_trivial_task():
    """A few steps of Adam separate two token sets (catches a head/branch that passes no gradient)."""
    torch.manual_seed(0)
    model = build_model(tiny_config(dropout=0.0, embed_dropout=0.0), VOCAB, 2)
    seqs = [torch.randint(1, 20, (6,)) for _ in range(16)] + [torch.randint(20, 40, (6,)) for _ in range(16)]
    ids, mask = pad_batch(seqs)
    y = torch.tensor([0] * 16 + [1] * 16)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(ids, mask), y)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(ids, mask).argmax(1) == y).float().mean().item() == 1.0


@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_lstm_pooling_over_the_real_tokens(pooling):
    """max: the largest output over the text's positions; mean: their average (pads excluded either way)."""
    torch.manual_seed(0)
    lstm = BiLSTMBranch(3, 4, 1, pooling, 0.0).eval()
    x = torch.randn(2, 6, 3)
    lengths = torch.tensor([6, 3])
    mask = torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)
    with torch.no_grad():
        out = lstm(x, mask, lengths)
        for i, n in enumerate(lengths.tolist()):
            alone = lstm(x[i : i + 1, :n], mask[i : i + 1, :n], lengths[i : i + 1])
            torch.testing.assert_close(out[i : i + 1], alone, atol=ATOL, rtol=0)
            f, _ = lstm.fwd[0](x[i : i + 1, :n])
            b, _ = lstm.bwd[0](x[i : i + 1, :n].flip(1))
            seq = torch.cat([f, b.flip(1)], dim=-1)
            expect = seq.amax(dim=1) if pooling == "max" else seq.mean(dim=1)
            torch.testing.assert_close(out[i : i + 1], expect, atol=ATOL, rtol=0)


def test_build_model_builds_the_architecture_only():
    """build_model reads the model group alone: training options (pretrained vectors, the seed) are
    init_model's (hybridlib.training), so a saved model is rebuilt from its checkpoint's config without data."""
    cfg = tiny_config(pretrained_embeddings="ppmi", lr=0.5, seed=7)
    torch.manual_seed(0)
    a = build_model(cfg, VOCAB, CLASSES)
    torch.manual_seed(0)
    b = build_model(tiny_config(), VOCAB, CLASSES)
    assert a.embedding.weight.requires_grad
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_branch_aux_heads_classify_each_branch_alone():
    """branch_aux_loss: one linear head per branch on that branch's pooled features; the joint logits are
    the same with or without them; off (or with one branch) the model has no such heads (old checkpoints load)."""
    ids, mask = pad_batch([random_ids(n, seed=n) for n in (3, 8, 12)])
    model = make_model(branches=["cnn", "lstm"], branch_aux_loss=0.5)
    logits, aux = model(ids, mask, with_aux=True)
    assert torch.equal(logits, model(ids, mask))
    parts = model.branch_features(ids, mask)
    assert set(aux) == {"lstm", "cnn"}
    for name, a in aux.items():
        assert a.shape == (3, CLASSES)
        assert torch.equal(a, model.aux_heads[name](parts[name]))
    for overrides in (dict(branches=["cnn", "lstm"]), dict(branches=["lstm"], branch_aux_loss=0.5)):
        plain = make_model(**overrides)
        assert plain(ids, mask, with_aux=True)[1] == {}
        assert not any(k.startswith("aux_heads") for k in plain.state_dict())


def test_branch_aux_loss_trains_the_branch_heads_and_logs_the_joint_loss():
    import torch.nn.functional as F

    from hybridlib.training import train_step

    ids, mask = pad_batch([random_ids(n, seed=n) for n in (3, 8, 12, 5)])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}
    cfg = tiny_config(branches=["cnn", "lstm"], branch_aux_loss=1.0, weight_decay=0.0, dropout=0.0, embed_dropout=0.0)
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, CLASSES).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    joint = F.cross_entropy(model(ids, mask), batch["labels"])
    loss, _, _ = train_step(cpu_loop(model, cfg), batch)
    assert loss.item() == pytest.approx(joint.item(), rel=1e-6)  # the log shows the joint head's loss
    after = model.state_dict()
    for name in ("aux_heads.lstm.1.weight", "aux_heads.cnn.1.weight"):
        assert not torch.equal(before[name], after[name])


def test_the_step_loss_is_the_joint_loss_plus_the_weighted_branch_losses():
    """The loss a training step optimises: CE(joint) + w * mean CE(branch); the log shows the first."""
    import torch.nn.functional as F

    from hybridlib.training import step_losses

    ids, mask = pad_batch([random_ids(n, seed=n) for n in (3, 8, 12, 5)])
    y = torch.tensor([0, 1, 2, 1])
    cfg = tiny_config(branches=["cnn", "lstm"], branch_aux_loss=0.5)
    model = make_model(branches=["cnn", "lstm"], branch_aux_loss=0.5)  # eval mode: no dropout
    loss, total, logits = step_losses(cpu_loop(model, cfg), ids, mask, y)
    _, aux = model(ids, mask, with_aux=True)
    joint = F.cross_entropy(logits, y)
    branch = sum(F.cross_entropy(a, y) for a in aux.values()) / len(aux)
    assert loss.item() == pytest.approx(joint.item(), rel=1e-6)
    assert total.item() == pytest.approx((joint + 0.5 * branch).item(), rel=1e-6)
    assert branch.item() > 0 and total.item() > loss.item()


def test_adversarial_perturbation_has_norm_eps_per_text_spares_padding_and_raises_the_loss():
    import torch.nn.functional as F

    from hybridlib.training import adversarial_perturbation, embedding_tap

    ids, mask = pad_batch([random_ids(n, seed=n) for n in (3, 8, 12, 5)])
    y = torch.tensor([0, 1, 2, 1])
    model = make_model(dropout=0.0, embed_dropout=0.0)
    with embedding_tap(model.embedding) as tap:
        loss = F.cross_entropy(model(ids, mask), y)
    loss.backward()
    r = adversarial_perturbation(tap.output.grad, 0.5)
    assert r.shape == (4, ids.shape[1], 8)
    assert torch.allclose(r.norm(dim=(1, 2)), torch.full((4,), 0.5))
    assert torch.equal(r[~mask], torch.zeros(int((~mask).sum()), 8))  # nothing moves the padding
    with torch.no_grad():
        with embedding_tap(model.embedding, add=r):
            adversarial = F.cross_entropy(model(ids, mask), y).item()
        noise = torch.randn_like(r) * mask.unsqueeze(-1)
        with embedding_tap(model.embedding, add=0.5 * noise / noise.norm(dim=(1, 2), keepdim=True)):
            random = F.cross_entropy(model(ids, mask), y).item()
    assert adversarial > loss.item() and adversarial > random


def test_adversarial_training_adds_the_perturbed_loss_gradient():
    from hybridlib.training import train_step

    ids, mask = pad_batch([random_ids(n, seed=n) for n in (3, 8, 12, 5)])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}

    def gradient(eps: float) -> torch.Tensor:
        """The gradient train_step stepped with (left in .grad by the step)."""
        cfg = tiny_config(dropout=0.0, embed_dropout=0.0, grad_clip=0.0, adversarial_eps=eps)
        model = make_model(dropout=0.0, embed_dropout=0.0).train()
        train_step(cpu_loop(model, cfg, torch.optim.SGD(model.parameters(), lr=1e-3)), batch)
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    plain = gradient(0.0)
    # a vanishing perturbation: the second pass has the same gradient, so the step's gradient doubles
    assert torch.allclose(gradient(1e-6), 2 * plain, rtol=1e-3, atol=1e-7)
    assert not torch.allclose(gradient(1.0), 2 * plain, rtol=1e-2, atol=1e-5)
