"""The CUDA code paths, checked on CPU: the packed (cuDNN) BiLSTM against the padded (oneDNN) one, the precision
policy, the CUDA collation (lengths in multiples of 64, pinned memory) and the training loop's deferred reads."""

from __future__ import annotations

import json
import math

import fixtures
import pytest
import torch

from hybridlib import model as model_mod
from hybridlib.batching import Collator, make_loader
from hybridlib.config import Config
from hybridlib.errors import ConfigError
from hybridlib.model import BiLSTMBranch, build_model
from hybridlib.runtime import (
    CUDA_PAD_MULTIPLE,
    LSTM_AUTOCAST_ENV,
    LSTM_PATH_ENV,
    autocast_dtype,
    lstm_autocast,
    lstm_path,
    resolve_precision,
)
from hybridlib.training import RunningSums

bench = fixtures.load_benchmark("bench")


def _batch(lengths: list[int], dim: int, T: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = T or max(lengths)
    lens = torch.tensor(lengths)
    mask = torch.arange(T).unsqueeze(0) < lens.unsqueeze(1)
    x = torch.randn(len(lengths), T, dim, generator=g) * mask.unsqueeze(-1)  # pads are zero, as embed() makes them
    return x, mask, lens


def _features_and_grads(branch: BiLSTMBranch, path: str, x, mask, lens, host_lengths=None):
    branch.path = path
    x = x.clone().requires_grad_()
    out = branch(x, mask, lens, host_lengths)
    finite = torch.isfinite(out)  # a text of no tokens max-pools to -inf on both paths
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out[finite] * weights[finite]).sum(), [x, *branch.parameters()])
    return out.detach(), finite, grads


# ----------------------------------------------------------------------------- packed vs padded BiLSTM


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("pooling", ["max", "mean"])
@pytest.mark.parametrize("train", [False, True])
def test_packed_path_matches_padded(layers, pooling, train):
    torch.manual_seed(0)
    branch = BiLSTMBranch(6, 5, layers, pooling, 0.0).train(train)  # dropout 0: the two paths draw differently
    x, mask, lens = _batch([9, 1, 4, 9, 6, 2], 6, T=12)  # padded past the longest text too
    a, fa, ga = _features_and_grads(branch, "padded", x, mask, lens)
    b, fb, gb = _features_and_grads(branch, "packed", x, mask, lens)
    assert torch.equal(fa, fb) and fa.all()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for u, v in zip(ga, gb):  # input gradient, then every LSTM weight and bias of both directions
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_packed_path_with_an_empty_text_and_host_lengths(pooling):
    torch.manual_seed(1)
    branch = BiLSTMBranch(4, 3, 1, pooling, 0.0).eval()
    x, mask, lens = _batch([5, 0, 3], 4, T=7)
    a, fa, _ = _features_and_grads(branch, "padded", x, mask, lens)
    b, fb, _ = _features_and_grads(branch, "packed", x, mask, lens, host_lengths=lens.clone())
    assert torch.equal(fa, fb)  # the empty text: -inf (max) or 0 (mean) on both
    torch.testing.assert_close(b[fb], a[fa], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layers", [1, 2])
def test_whole_model_same_logits_on_both_paths_and_same_state_dict(layers):
    cfg = Config(lstm_layers=layers, embed_dim=8, lstm_hidden=6, cnn_filters=4, mlp_hidden=8, branch_aux_loss=0.5)
    torch.manual_seed(0)
    net = build_model(cfg, vocab_size=50, num_classes=3).eval()
    ids = torch.randint(1, 50, (4, 10))
    for i, n in enumerate([10, 3, 7, 1]):
        ids[i, n:] = 0
    keys = list(net.state_dict())
    with torch.no_grad():
        net.lstm.path = "padded"
        a = net(ids)
        net.lstm.path = "packed"
        b = net(ids, host_lengths=ids.ne(0).sum(1))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # the packed path adds no parameter and renames none: checkpoints load either way, unchanged
    assert list(net.state_dict()) == keys
    expected = {f"lstm.{d}.{i}.{w}" for d in ("fwd", "bwd") for i in range(layers)
                for w in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")}
    assert expected == {k for k in keys if k.startswith("lstm.")}
    other = build_model(cfg, vocab_size=50, num_classes=3).eval()
    other.load_state_dict(net.state_dict())
    other.lstm.path = "padded"
    with torch.no_grad():
        torch.testing.assert_close(other(ids), a, rtol=0, atol=0)


def test_packed_weights_order_is_a_bidirectional_lstms():
    branch = BiLSTMBranch(4, 3, 2, "max", 0.0)
    ref = torch.nn.LSTM(4, 3, num_layers=2, bidirectional=True, batch_first=True)
    assert [tuple(w.shape) for w in branch.packed_weights()] == [tuple(w.shape) for w in ref._flat_weights]
    with torch.no_grad():
        for mine, theirs in zip(branch.packed_weights(), ref._flat_weights):
            theirs.copy_(mine)
    x, mask, lens = _batch([5, 5], 4)  # no padding: a plain bidirectional LSTM is then the same function
    branch.path = "packed"
    out, _ = ref(x)
    torch.testing.assert_close(branch.eval()(x, mask, lens), out.amax(dim=1), rtol=1e-5, atol=1e-6)


def test_cpu_default_is_the_padded_path(monkeypatch):
    monkeypatch.delenv(LSTM_PATH_ENV, raising=False)
    branch = BiLSTMBranch(4, 3, 1, "max", 0.0)
    assert branch.resolved_path("cpu") == "padded" and branch.resolved_path("cuda") == "packed"
    called = []
    monkeypatch.setattr(BiLSTMBranch, "_packed", lambda *a: called.append(1))
    x, mask, lens = _batch([3, 2], 4)
    branch(x, mask, lens)
    assert not called


def test_lstm_path_policy(monkeypatch):
    monkeypatch.delenv(LSTM_PATH_ENV, raising=False)
    assert lstm_path("cuda") == "packed" and lstm_path("cpu") == "padded"
    monkeypatch.setenv(LSTM_PATH_ENV, "padded")
    assert lstm_path("cuda") == "padded"
    monkeypatch.setenv(LSTM_PATH_ENV, "packed")
    assert lstm_path("cpu") == "packed"
    monkeypatch.setenv(LSTM_PATH_ENV, "sideways")
    with pytest.raises(ConfigError, match=LSTM_PATH_ENV):
        lstm_path("cpu")


# ----------------------------------------------------------------------------- precision policy


@pytest.mark.parametrize(
    "precision, device, native, dtype, lstm_dtype",
    [
        ("auto", "cuda", True, torch.bfloat16, torch.float32),
        ("auto", "cuda", False, torch.float16, torch.float32),
        ("bf16", "cuda", True, torch.bfloat16, torch.float32),
        ("fp16", "cuda", True, torch.float16, torch.float32),
        ("fp32", "cuda", True, None, torch.float32),
        ("auto", "cpu", True, torch.bfloat16, torch.bfloat16),  # CPU: as before, the LSTM autocasts too
        ("auto", "cpu", False, None, torch.float32),
        ("bf16", "cpu", False, torch.bfloat16, torch.bfloat16),
        ("fp32", "cpu", True, None, torch.float32),
    ],
)
def test_precision_policy(monkeypatch, precision, device, native, dtype, lstm_dtype):
    monkeypatch.delenv(LSTM_AUTOCAST_ENV, raising=False)
    amp = autocast_dtype(precision, device, native)
    assert amp == dtype and (amp if lstm_autocast(device, amp) else torch.float32) == lstm_dtype
    assert lstm_autocast(device, amp) == (dtype is not None and device == "cpu")


def test_precision_policy_fp16_on_cpu_and_overrides(monkeypatch):
    monkeypatch.delenv(LSTM_AUTOCAST_ENV, raising=False)
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        autocast_dtype("fp16", "cpu", True)
    assert not lstm_autocast("cuda", torch.bfloat16) and lstm_autocast("cpu", torch.bfloat16)
    monkeypatch.setenv(LSTM_AUTOCAST_ENV, "1")
    assert lstm_autocast("cuda", autocast_dtype("bf16", "cuda", True))  # the LSTM in bf16 too
    assert lstm_autocast("cuda", torch.float16)
    assert not lstm_autocast("cpu", None) and not lstm_autocast("cuda", None)
    assert bench.precision_names(torch.float16, "cuda") == {"precision": "fp16", "lstm_precision": "fp16"}
    monkeypatch.delenv(LSTM_AUTOCAST_ENV)
    assert bench.precision_names(torch.bfloat16, "cpu") == {"precision": "bf16", "lstm_precision": "bf16"}
    assert bench.precision_names(None, "cpu") == {"precision": "fp32", "lstm_precision": "fp32"}
    assert bench.precision_names(torch.bfloat16, "cuda")["lstm_precision"] in ("fp32", "fp32 (TF32)")


def test_resolve_precision_unchanged_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr("hybridlib.runtime.cpu_supports_bf16", lambda native=native: native)
        assert resolve_precision("auto", cpu) == (torch.bfloat16 if native else None)
        assert resolve_precision("bf16", cpu) == torch.bfloat16
        assert resolve_precision("fp32", cpu) is None
    with pytest.raises(ConfigError):
        resolve_precision("fp16", cpu)


@pytest.mark.parametrize("path", ["padded", "packed"])
def test_lstm_leaves_autocast_when_the_policy_says_so(monkeypatch, path):
    """As on CUDA: under bf16 autocast the LSTM computes in fp32, exactly as without autocast."""
    torch.manual_seed(0)
    branch = BiLSTMBranch(6, 5, 2, "max", 0.0).eval()
    branch.path = path
    x, mask, lens = _batch([7, 3, 5], 6)
    with torch.no_grad():
        ref = branch(x, mask, lens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            as_cpu = branch(x, mask, lens)  # CPU policy: the LSTM autocasts (bf16)
        monkeypatch.setattr(model_mod, "lstm_autocast", lambda device_type, dtype: False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outside = branch(x, mask, lens)
    assert outside.dtype == torch.float32 and torch.equal(outside, ref)
    assert not torch.equal(as_cpu.float(), ref)


# ----------------------------------------------------------------------------- CUDA collation


def test_collator_rounds_lengths_up_to_the_multiple():
    rows = [{"input_ids": [5, 6, 7], "label": 0}, {"input_ids": list(range(1, 71)), "label": 1}]
    out = Collator(0, pad_multiple=64, max_length=512)(rows)
    assert out["input_ids"].shape == (2, 128)
    assert out["attention_mask"].sum(1).tolist() == [3, 70]
    assert out["input_ids"][0, :3].tolist() == [5, 6, 7] and not out["input_ids"][0, 3:].any()
    assert Collator(0, pad_multiple=64, max_length=100)(rows)["input_ids"].shape == (2, 100)  # never past max_length
    assert Collator(0, pad_multiple=64, max_length=64)(rows)["input_ids"].shape == (2, 70)  # nor below the longest
    assert Collator(0, pad_multiple=64, max_length=512)(rows[:1])["input_ids"].shape == (1, 64)
    assert Collator(0)(rows)["input_ids"].shape == (2, 70)  # CPU: the longest, as before
    assert Collator(0, pad_to=80, pad_multiple=64)(rows)["input_ids"].shape == (2, 80)  # pad_to wins
    lengths = {Collator(0, pad_multiple=CUDA_PAD_MULTIPLE, max_length=512)([{"input_ids": [1] * n}])["input_ids"].size(1)
               for n in range(1, 513)}
    assert lengths == {64 * k for k in range(1, 9)}  # at most 8 shapes at 512 tokens


def test_make_loader_pads_and_pins_on_cuda_only(tiny_params):
    from hybridlib.config import load_config
    from hybridlib.data import prepare_data

    cfg = load_config(tiny_params, {"batch_size": 8})
    data = prepare_data(cfg)
    cpu = make_loader(data.splits["train"], cfg, data.pad_id, torch.device("cpu"), epoch=0)
    assert cpu.collate_fn.pad_multiple == 1 and not cpu.pin_memory
    cuda = make_loader(data.splits["train"], cfg, data.pad_id, torch.device("cuda"), epoch=0)
    assert cuda.collate_fn.pad_multiple == CUDA_PAD_MULTIPLE and cuda.pin_memory  # built, not iterated (no GPU)
    assert cuda.collate_fn.max_length == cfg.max_length
    # the extra padding changes no logit, on either LSTM path
    torch.manual_seed(0)
    net = build_model(cfg, data.vocab_size, len(data.label_names), data.pad_id).eval()
    batch = next(iter(cpu))
    wide = Collator(data.pad_id, pad_multiple=CUDA_PAD_MULTIPLE, max_length=512)(
        [{"input_ids": r[m].tolist()} for r, m in zip(batch["input_ids"], batch["attention_mask"])])
    assert wide["input_ids"].size(1) % CUDA_PAD_MULTIPLE == 0 and wide["input_ids"].size(1) > batch["input_ids"].size(1)
    with torch.no_grad():
        for path in ("padded", "packed"):
            net.lstm.path = path
            torch.testing.assert_close(net(wide["input_ids"], wide["attention_mask"]),
                                       net(batch["input_ids"], batch["attention_mask"]), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- deferred reads in the training loop


def test_running_sums_equal_per_step_reads_and_find_the_first_non_finite_loss():
    losses = [0.693, 0.51234567, float("nan"), 0.4, float("inf")]
    ns, corrects = [8, 8, 8, 5, 8], [3, 5, 4, 2, 6]
    expected = [0.0, 0.0, 0.0]
    running = RunningSums()
    for step, (loss, n, c) in enumerate(zip(losses, ns, corrects), 1):
        t = torch.tensor(loss, dtype=torch.float32)
        expected[0] += t.item() * n  # what train_epoch summed before
        expected[1] += torch.tensor(c).item()
        expected[2] += n
        running.add(step, t, torch.tensor(c), n)
    bad = running.read()
    assert bad[0] == 3 and math.isnan(bad[1])
    assert running.sums[1:] == expected[1:] and math.isnan(running.sums[0])
    running = RunningSums()
    expected = [0.0, 0.0, 0.0]
    for step, (loss, n, c) in enumerate(zip(losses[:2] + losses[3:4], ns, corrects), 1):
        t = torch.tensor(loss, dtype=torch.float32)
        expected[0] += t.item() * n
        expected[1] += torch.tensor(c).item()
        expected[2] += n
        running.add(step, t, torch.tensor(c), n)
        if step == 2:
            assert running.read() is None
    assert running.read() is None and running.sums == expected  # bit for bit
    assert running.read() is None  # nothing pending


def test_validate_sums_as_per_batch_reads(tiny_params):
    from hybridlib.config import load_config
    from hybridlib.data import prepare_data
    from hybridlib.training import validate

    cfg = load_config(tiny_params, {"eval_batch_size": 7})
    data = prepare_data(cfg)
    torch.manual_seed(0)
    net = build_model(cfg, data.vocab_size, len(data.label_names), data.pad_id).eval()
    sums = [0.0, 0.0, 0.0]  # what validate summed before: one read per batch
    with torch.no_grad():
        for batch in make_loader(data.splits["validation"], cfg, data.pad_id):
            logits = net(batch["input_ids"], batch["attention_mask"]).float()
            sums[0] += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
            sums[1] += (logits.argmax(1) == batch["labels"]).sum().item()
            sums[2] += batch["labels"].numel()
    assert validate(net, data.splits["validation"], cfg, data.pad_id) == (
        sums[0] / sums[2], sums[1] / sums[2])


# ----------------------------------------------------------------------------- the bench reports the path


@pytest.mark.parametrize("path", [None, "packed"])
def test_bench_reports_precision_and_lstm_path(tiny_params, capsys, monkeypatch, path):
    monkeypatch.delenv(LSTM_AUTOCAST_ENV, raising=False)
    if path:
        monkeypatch.setenv(LSTM_PATH_ENV, path)  # the CUDA path, trained and served end to end on CPU
    else:
        monkeypatch.delenv(LSTM_PATH_ENV, raising=False)
    code = bench.main([str(tiny_params), "--json", "--steps", "2", "--warmup", "1", "--eval-texts", "16",
                 "--predict-n", "2", "--no-cold", "-p", "batch_size", "8", "-p", "precision", "fp32"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["precision"] == "fp32" and out["lstm_precision"] == "fp32"
    assert out["lstm_path"] == (path or "padded") and out["pad_multiple"] == 1
    assert out["training"]["naive_lstm_path"] == "padded"
    assert out["training"]["hybridlib"]["steps"] == 2 and out["training"]["naive"]["steps"] == 2
    assert out["overrides_env"] == ({LSTM_PATH_ENV: path} if path else {})
