"""Per-sample clipping (fast path and torch.func path) against a naive per-sample loop in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from goldenpath.config import load_config
from goldenpath.data import SourceInfo
from goldenpath.models import build_model, sample_losses
from goldenpath.dp import layer_rules, per_sample
from goldenpath.dp.per_sample import clipped_grad_sum, per_sample_clip
from goldenpath.training.runtime import free_memory_bytes

@pytest.fixture(autouse=True)
def float64():
    """This module's checks are float64."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def naive(model, loss_fn, batch, clip):
    """sum_i clip_C(g_i) by one backward per sample; the norm over all trained parameters."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    b = len(next(iter(batch.values())))
    for i in range(b):
        loss = loss_fn(model, {k: v[i : i + 1] for k, v in batch.items()})[0]
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())]
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        norms.append(norm)
        scale = min(1.0, clip / float(norm)) if norm > 0 else 1.0
        for n, g in zip(params, grads):
            total[n] += scale * g
    return total, torch.stack(norms)


def check_paths(model, loss_fn, batch, *, methods=("fast", "vmap"), reference=()):
    """Both paths equal the naive loop, with the clip norm set so that some samples are clipped, some not.

    ``reference``: the parameters the fast path may hand to the torch.func reference path.
    """
    _, norms = naive(model, loss_fn, batch, float("inf"))
    clip = float(norms.median())
    want, _ = naive(model, loss_fn, batch, clip)
    assert (norms > clip).any() and (norms < clip).any()
    for method in methods:
        got = per_sample_clip(model, loss_fn, batch, clip, method=method, chunk=3)
        # no graph rides along (a training step adds the sums into p.grad, micro-batch after micro-batch)
        assert not got.norms.requires_grad and not any(g.requires_grad for g in got.grads.values()), method
        torch.testing.assert_close(got.norms, norms, rtol=1e-9, atol=1e-12, msg=method)
        if method == "fast":
            assert got.reference == tuple(reference)
        assert set(got.grads) == set(want)
        for n in want:
            torch.testing.assert_close(got.grads[n], want[n], rtol=1e-9, atol=1e-12, msg=f"{method}: {n}")
        torch.testing.assert_close(got.losses, torch.stack([loss_fn(model, {k: v[i:i + 1] for k, v in batch.items()})[0]
                                                            for i in range(len(norms))]).detach())


class Head(nn.Module):
    """A layer under test followed by a fixed nonlinear per-sample readout."""

    def __init__(self, layer, out_shape):
        super().__init__()
        self.layer = layer
        self.register_buffer("r", torch.randn(out_shape))

    def forward(self, x):
        return self.layer(x)


def readout(model, batch):
    out = model(batch["x"])
    return (torch.tanh(out) * model.r).flatten(1).sum(1) ** 2


class Scaled(nn.Module):
    """A module with its own parameter and no rule: per-sample gradients by torch.func on the module."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.inner = nn.Linear(d, d)

    def forward(self, x):
        return self.inner(x) * self.scale


class Broadcast(nn.Module):
    """A parameter used through an input without a batch dimension: falls back to the reference path."""

    def __init__(self, t, d):
        super().__init__()
        self.pos = nn.Embedding(t, d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return self.proj(x + self.pos(torch.arange(x.shape[1])[None]))


class Tied(nn.Module):
    """An embedding shared with the output layer (as in GPT-2)."""

    def __init__(self, v, d):
        super().__init__()
        self.emb = nn.Embedding(v, d, padding_idx=0)
        self.mid = nn.LayerNorm(d)
        self.out = nn.Linear(d, v, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.mid(self.emb(x))))


def conv1d(nx, nf):
    from transformers.pytorch_utils import Conv1D
    layer = Conv1D(nf, nx)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    return layer


B = 7
LAYERS = {
    "linear": (lambda: nn.Linear(5, 4), (B, 5), (4,)),
    "linear-seq": (lambda: nn.Linear(5, 4), (B, 6, 5), (6, 4)),
    "linear-big-seq": (lambda: nn.Linear(8, 8), (B, 3, 8), (3, 8)),
    "linear-no-bias": (lambda: nn.Linear(5, 4, bias=False), (B, 6, 5), (6, 4)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (B, 3, 7, 7), (4, 4, 4)),
    "conv2d-dilated": (lambda: nn.Conv2d(2, 3, (3, 2), padding=(2, 1), dilation=2, bias=False), (B, 2, 6, 5),
                       (3, 6, 5)),
    "conv2d-deep": (lambda: nn.Conv2d(8, 8, 3), (B, 8, 4, 4), (8, 2, 2)),
    "conv2d-same": (lambda: nn.Conv2d(2, 3, 3, padding="same"), (B, 2, 5, 5), (3, 5, 5)),  # module-local func
    "layernorm": (lambda: nn.LayerNorm(6), (B, 4, 6), (4, 6)),
    "layernorm-no-bias": (lambda: nn.LayerNorm(6, bias=False), (B, 4, 6), (4, 6)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (B, 4, 3, 3), (4, 3, 3)),
    "rmsnorm": (lambda: nn.RMSNorm(6), (B, 4, 6), (4, 6)),  # module-local torch.func
    "conv1d": (lambda: conv1d(5, 3), (B, 4, 5), (4, 3)),
    "scaled": (lambda: Scaled(4), (B, 3, 4), (3, 4)),
    "broadcast": (lambda: Broadcast(5, 4), (B, 5, 4), (5, 4)),
}


@pytest.fixture(params=["auto", "ghost", "per-sample"])
def norm_route(request, monkeypatch):
    """Run a check with goldenpath's own choice (book-keeping: per-sample gradients formed once where memory
    allows), then, with nothing kept formed, forcing ghost norms, then per-sample gradients formed and dropped."""
    if request.param != "auto":
        monkeypatch.setattr(per_sample, "FORMED_SHARE", 0.0)
        monkeypatch.setattr(layer_rules, "per_sample_cheaper", lambda *_: request.param == "per-sample")
    return request.param


@pytest.mark.parametrize("name", list(LAYERS))
def test_each_layer_type_matches_the_naive_loop(name, norm_route):
    torch.manual_seed(0)
    make, x_shape, out_shape = LAYERS[name]
    model = Head(make(), out_shape)
    for p in model.parameters():  # non-trivial affine parameters for the norm layers
        nn.init.normal_(p)
    check_paths(model, readout, {"x": torch.randn(x_shape)},
                reference=("layer.pos.weight",) if name == "broadcast" else ())


@pytest.mark.parametrize("name", ["layernorm", "groupnorm"])
def test_norm_layers_match_the_naive_loop_when_normalised_a_few_samples_at_a_time(name, monkeypatch):
    monkeypatch.setattr(layer_rules, "_CACHE_ELEMENTS", 50)  # 2 (layer norm) or 1 sample per chunk of 7
    test_each_layer_type_matches_the_naive_loop(name, "auto")


@pytest.mark.parametrize("name", ["layernorm", "groupnorm"])
@pytest.mark.parametrize("statistics", ["forward", "own"])
def test_norm_layers_match_the_naive_loop_from_their_forwards_statistics_or_their_own(name, statistics, monkeypatch):
    """A norm layer's rule takes the per-sample mean and 1/std its forward computed (``forward_saved``, read as
    the layer returns), or, where the graph holds none, normalises its input itself: both equal the naive loop,
    on inputs far from zero mean (the group norm's form subtracts mean x sum g)."""
    read, forward_saved = [], layer_rules.forward_saved

    def saved(module, output):
        read.append(forward_saved(module, output))
        return read[-1] if statistics == "forward" else None

    monkeypatch.setattr(layer_rules, "forward_saved", saved)
    torch.manual_seed(0)
    make, x_shape, out_shape = LAYERS[name]
    model = Head(make(), out_shape)
    for p in model.parameters():
        nn.init.normal_(p)
    check_paths(model, readout, {"x": 3 * torch.randn(x_shape) + 20})
    assert read and all(r is not None for r in read)  # the forward's statistics were there to take


@pytest.mark.parametrize("offset", [100.0, 1000.0])
def test_group_norm_from_its_forwards_statistics_in_float32_is_as_accurate_as_pytorchs_own_backward(offset):
    """In float32 the group norm's form (sum a g - mean sum g) / std cancels when the mean is far from 0 against
    the spread, as PyTorch's own group-norm backward does: its per-sample scale gradients stay within 1e-4
    (mean / std = 100) and 1e-3 (1000) of float64, and no further from it than PyTorch's."""
    gen = torch.Generator().manual_seed(0)
    gn = nn.GroupNorm(4, 8).float()
    a = torch.randn(6, 8, 16, 16, generator=gen, dtype=torch.float32) + offset
    g = torch.randn(6, 8, 16, 16, generator=gen, dtype=torch.float32)
    saved = layer_rules.forward_saved(gn, gn(a))
    assert saved is not None
    got = layer_rules.RULES[nn.GroupNorm](gn, a, g, saved)["weight"].double()
    pytorchs = torch.stack([torch.autograd.grad(gn(a[i : i + 1]), gn.weight, g[i : i + 1])[0] for i in range(6)])
    x = a.double().view(6, 4, -1)
    xhat = ((x - x.mean(-1, keepdim=True)) * (x.var(-1, unbiased=False, keepdim=True) + gn.eps).rsqrt())
    want = (xhat.view_as(a) * g.double()).sum((2, 3))
    error = float((got - want).norm() / want.norm())
    assert error < 1e-4 * offset / 100
    assert error <= float((pytorchs.double() - want).norm() / want.norm())


def test_norm_statistics_are_not_read_under_saved_tensor_hooks():
    """Under saved-tensor hooks (activation checkpointing) reading a node's statistics would run the hooks (a
    checkpoint's recomputation) in the middle of the forward: the rule normalises the input itself instead."""
    gn = nn.GroupNorm(2, 4)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    assert layer_rules.forward_saved(gn, gn(x)) is not None
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert layer_rules.forward_saved(gn, gn(x)) is None


def test_embedding_with_padding_and_repeated_tokens(norm_route):
    torch.manual_seed(1)
    model = Head(nn.Embedding(6, 3, padding_idx=2), (5, 3))
    x = torch.tensor([[0, 1, 2, 1, 1], [2, 2, 2, 2, 3], [4, 4, 0, 5, 5], [1, 2, 3, 4, 5], [0, 0, 0, 0, 0]])
    check_paths(model, readout, {"x": x})


def test_tied_embedding_and_output_layer_sum_both_uses(norm_route):
    torch.manual_seed(2)
    model = Tied(9, 5)

    def loss(m, batch):
        return F.cross_entropy(m(batch["x"]).flatten(0, 1), batch["y"].flatten(), reduction="none").view(-1, 6).sum(1)

    check_paths(model, loss, {"x": torch.randint(0, 9, (B, 6)), "y": torch.randint(0, 9, (B, 6))})


def test_frozen_parameters_are_left_out():
    torch.manual_seed(3)
    model = Head(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)), (3,))
    model.layer[0].weight.requires_grad_(False)
    check_paths(model, readout, {"x": torch.randn(B, 4)})
    assert "layer.0.weight" not in clipped_grad_sum(model, readout, {"x": torch.randn(B, 4)}, 1.0)


IMAGES = SourceInfo("classification", (3, 8, 8), 5)
TEXT = SourceInfo("lm", (8,), 11)


def model_of(*overrides):
    return load_config(None, [*overrides, "budget.steps=1"]).model


@pytest.mark.parametrize("overrides", [
    ["model.name=cnn", "model.width=4", "model.depth=2"],
    ["model.name=cnn", "model.width=4", "model.depth=2", "model.norm=group"],
    ["model.name=resnet18", "model.width=8", "model.norm=group"],
    ["model.name=vit", "model.width=8", "model.depth=1", "model.heads=2", "model.patch_size=4"],
], ids=["cnn", "cnn-gn", "resnet18-gn", "vit"])
def test_vision_models_match_the_naive_loop(overrides, norm_route):
    model = build_model(model_of(*overrides), IMAGES, seed=0).double()
    torch.manual_seed(4)
    batch = {"x": torch.randn(6, 3, 8, 8), "y": torch.randint(0, 5, (6,))}
    check_paths(model, sample_losses, batch)


@pytest.mark.parametrize("overrides", [
    ["model.name=gpt2"], ["model.name=gpt2", "model.tie_embeddings=false"], ["model.name=llama", "model.kv_heads=1"],
], ids=["gpt2-tied", "gpt2-untied", "llama"])
def test_language_models_match_the_naive_loop_with_padding(overrides, norm_route):
    model = build_model(model_of("data.source=markov", "model.width=8", "model.depth=2", "model.heads=2",
                                 "model.attention=eager", *overrides), TEXT, seed=0).double()
    torch.manual_seed(5)
    ids = torch.randint(0, 11, (5, 8))
    labels = ids.clone()
    for i, n in enumerate([8, 3, 6, 1, 8]):  # sequences of unequal length, padded with -100
        labels[i, n:] = -100
    check_paths(model, sample_losses, {"input_ids": ids, "labels": labels})


@pytest.mark.parametrize("overrides", [
    ["data.source=markov", "model.name=gpt2", "model.width=32", "model.depth=2", "model.heads=2",
     "model.attention=eager"],
    ["model.name=cnn", "model.width=8", "model.depth=2", "model.norm=group"],
], ids=["gpt2-tied", "cnn-gn"])
def test_under_a_bf16_autocast_a_clipped_gradient_has_norm_c_to_float32_roundings(overrides, recwarn):
    """A GPU run's default is a bf16 autocast. The forward and backward run in it, but the norms that set the clip
    factors and the clipped sum they weigh must agree in float32: in bf16 a clipped gradient's norm came out up
    to 7e-4 away from C (3.6e-4 on GPT-2), and the first-batch check sent layers to torch.func. One sample per
    batch: the clipped sum is that sample's clipped gradient."""
    torch.set_default_dtype(torch.float32)
    info = SourceInfo("lm", (16,), 50) if "model.name=gpt2" in overrides else IMAGES
    model = build_model(model_of(*overrides), info, seed=0)
    g = torch.Generator().manual_seed(0)
    gap = []
    for _ in range(4):
        if info.task == "lm":
            ids = torch.randint(0, 50, (1, 16), generator=g)
            batch = {"input_ids": ids, "labels": ids}
        else:
            batch = {"x": torch.randn(1, 3, 8, 8, generator=g), "y": torch.randint(0, 5, (1,), generator=g)}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            free = per_sample_clip(model, sample_losses, batch, float("inf"))
            clip = float(free.norms[0]) / 2
            clipped = per_sample_clip(model, sample_losses, batch, clip)
        for got, want in ((free, float(free.norms[0])), (clipped, clip)):
            norm = float(torch.sqrt(sum(v.double().square().sum() for v in got.grads.values())))
            gap.append(abs(norm / want - 1))
    assert max(gap) < 1e-5
    assert not [w for w in recwarn if "disagree" in str(w.message)]


def test_batch_norm_is_rejected_with_the_fix():
    model = build_model(model_of("model.name=cnn", "model.width=4", "model.depth=1", "model.norm=batch"), IMAGES,
                        seed=0)
    with pytest.raises(ValueError, match="group norm"):
        clipped_grad_sum(model, sample_losses, {"x": torch.randn(2, 3, 8, 8), "y": torch.tensor([0, 1])}, 1.0)


def test_an_embedding_with_max_norm_is_rejected_with_the_fix():
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="max_norm=None"):
        clipped_grad_sum(model, lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none"),
                         {"x": torch.randint(0, 10, (3, 2)), "y": torch.tensor([0, 1, 2])}, 1.0)


@pytest.mark.parametrize("batch_size", [1, 4])  # 1: the fast path hands the whole model to torch.func
def test_torch_func_under_a_bf16_autocast_falls_back_to_float32_where_it_meets_mixed_dtypes(batch_size, recwarn):
    """A LayerNorm fed bf16 under the autocast: torch.func raised 'expected scalar type BFloat16 but found Float'
    (both methods, and the fast path with one sample); now the per-sample gradients are taken in float32, equal
    to a float64 loop to float32 roundings, with one warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 5)).float()
    loss_fn = lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none")  # noqa: E731
    batch = {"x": torch.randn(batch_size, 8, dtype=torch.float32), "y": torch.randint(0, 5, (batch_size,))}
    _, want = naive(_double(model), loss_fn, {"x": batch["x"].double(), "y": batch["y"]}, float("inf"))
    for method, rtol in (("vmap", 1e-5), ("fast", 1e-2)):  # the fast path's rules read the bf16 forward
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = per_sample_clip(model, loss_fn, batch, 1.0, method=method)
        torch.testing.assert_close(got.norms, want, rtol=rtol, atol=0, msg=method)
    assert sum("taken in float32" in str(w.message) for w in recwarn) == 1


def _double(model):
    import copy

    return copy.deepcopy(model).double()


# ----------------------------------------------------------------------------- layers without a rule


class Attention(nn.Module):
    """nn.MultiheadAttention returns a tuple and reads its out_proj's weight directly."""

    def __init__(self, d, batch_first=True):
        super().__init__()
        self.attn, self.batch_first = nn.MultiheadAttention(d, 2, batch_first=batch_first), batch_first

    def forward(self, x):
        x = x if self.batch_first else x.transpose(0, 1)
        out = self.attn(x, x, x)[0]
        return out if self.batch_first else out.transpose(0, 1)


class Recurrent(nn.Module):
    def __init__(self, cell, batch_first=True):
        super().__init__()
        self.rnn, self.batch_first = cell, batch_first

    def forward(self, x):
        out = self.rnn(x if self.batch_first else x.transpose(0, 1))[0]
        return out if self.batch_first else out.transpose(0, 1)


class Encoder(nn.Module):
    def __init__(self, d, batch_first):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=batch_first)
        self.batch_first = batch_first

    def forward(self, x):
        return self.enc(x) if self.batch_first else self.enc(x.transpose(0, 1)).transpose(0, 1)


class ParentReadsChild(nn.Module):
    """A parameter read directly in a parent's forward, and also used through its own module."""

    def __init__(self, d):
        super().__init__()
        self.child = nn.Linear(d, d)
        self.scale = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.tanh(self.child(x)) * self.scale + F.linear(x, self.child.weight)


class ReadsOnly(nn.Module):
    """A parent owning no parameter reads its child's weight; the child is never called."""

    def __init__(self, d):
        super().__init__()
        self.child = nn.Linear(d, d)

    def forward(self, x):
        return F.linear(torch.tanh(x), self.child.weight) + self.child.bias


class InPlace(nn.Module):
    """A layer's output changed in place afterwards (the gradient wanted is the one before the change)."""

    def __init__(self, d):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.a(x)
        h.mul_(2.0).tanh_()
        return self.b(h)


D, T = 4, 5
UNRULED = {
    "mha": (lambda: Attention(D), T),
    "mha-seq-first": (lambda: Attention(D, batch_first=False), T),
    "mha-seq-first-t-equals-b": (lambda: Attention(D, batch_first=False), B),
    "lstm": (lambda: Recurrent(nn.LSTM(D, D, batch_first=True)), T),
    "lstm-seq-first": (lambda: Recurrent(nn.LSTM(D, D), batch_first=False), T),
    "gru": (lambda: Recurrent(nn.GRU(D, D, batch_first=True)), T),
    "gru-seq-first": (lambda: Recurrent(nn.GRU(D, D), batch_first=False), T),
    "encoder": (lambda: Encoder(D, batch_first=True), T),
    "encoder-seq-first": (lambda: Encoder(D, batch_first=False), T),
    "encoder-seq-first-t-equals-b": (lambda: Encoder(D, batch_first=False), B),
    "parent-reads-child": (lambda: ParentReadsChild(D), T),
    "reads-only": (lambda: ReadsOnly(D), T),
    "in-place": (lambda: InPlace(D), T),
}


@pytest.mark.parametrize("name", list(UNRULED))
def test_layers_without_a_rule_match_the_naive_loop(name, recwarn):
    torch.manual_seed(6)
    make, t = UNRULED[name]
    model = Head(make(), (t, D))
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    batch = {"x": torch.randn(B, t, D)}
    _, norms = naive(model, readout, batch, float("inf"))
    clip = float(norms.median())
    want, _ = naive(model, readout, batch, clip)
    for method in ("fast", "vmap"):
        got = per_sample_clip(model, readout, batch, clip, method=method, chunk=3)
        torch.testing.assert_close(got.norms, norms, rtol=1e-9, atol=1e-12, msg=method)
        for n in want:
            torch.testing.assert_close(got.grads[n], want[n], rtol=1e-9, atol=1e-12, msg=f"{method}: {n}")


def test_a_model_whose_every_call_returns_a_tuple_goes_to_the_reference_path():
    torch.manual_seed(7)
    model = nn.LSTM(3, 2, batch_first=True)  # no recorded call gives per-sample outputs

    def loss(m, batch):
        return m(batch["x"])[0].square().sum((1, 2))

    batch = {"x": torch.randn(B, 4, 3)}
    with pytest.warns(UserWarning, match="loop over samples"):
        check_paths(model, loss, batch, reference=tuple(sorted(n for n, _ in model.named_parameters())))


def test_layers_with_a_rule_keep_it_beside_layers_without():
    torch.manual_seed(8)
    model = Head(nn.Sequential(nn.Linear(D, D), Attention(D), nn.LayerNorm(D)), (T, D))
    batch = {"x": torch.randn(B, T, D)}
    got = per_sample_clip(model, readout, batch, 1.0)
    # the attention runs under torch.func on its own module (a tuple output), the rest by rule: no whole-model path
    assert got.reference == ()
    check_paths(model, readout, batch)


def test_the_first_batch_check_routes_a_sequence_first_layer_whose_length_equals_the_batch():
    torch.manual_seed(9)
    model = Head(Encoder(D, batch_first=False), (B, D))
    batch = {"x": torch.randn(B, B, D)}
    with pytest.warns(UserWarning, match="disagree with a loop over samples"):
        got = per_sample_clip(model, readout, batch, 1.0)
    assert "layer.enc.linear1.weight" in got.reference
    check_paths(model, readout, batch, reference=got.reference)


def test_the_first_batch_check_compares_in_strict_float32():
    """On a GPU a bf16 run turns TF32 on: the check compares the fast path with the loop over samples in
    float32 proper, so TF32's rounding cannot send a parameter to the slow path (the switches come back)."""
    torch.manual_seed(10)
    model = Head(nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D)), (T, D))
    seen = []
    model.register_forward_pre_hook(lambda *_: seen.append((torch.backends.cuda.matmul.allow_tf32,
                                                            torch.backends.cudnn.allow_tf32)))
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        per_sample_clip(model, readout, {"x": torch.randn(B, T, D)}, 1.0)
        assert seen[:1 + per_sample._CHECK_SAMPLES] == [(False, False)] * (1 + per_sample._CHECK_SAMPLES)
        assert seen[-1] == (True, True)  # the step itself runs as the run set it
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("name", ["conv2d", "conv2d-dilated", "conv2d-deep"])
def test_the_gpu_route_of_convolutions_matches_the_naive_loop(name, monkeypatch):
    """A GPU takes every convolution's per-sample weight gradients from batched products of its patches, a
    few samples at a time when memory is short: the same gradients (forced here on the CPU, two samples at a
    time)."""
    monkeypatch.setattr(layer_rules, "_patch_products", lambda a: True)
    monkeypatch.setattr(layer_rules, "per_sample_cheaper", lambda *_: True)  # not the ghost norm
    monkeypatch.setattr(layer_rules, "_samples_per_product", lambda a, patch_bytes: 2)  # memory short: 2 at a time
    monkeypatch.setattr(per_sample, "FORMED_SHARE", 0.0)
    calls = []
    product = layer_rules._patch_product
    monkeypatch.setattr(layer_rules, "_patch_product", lambda a, g, m: calls.append(1) or product(a, g, m))
    torch.manual_seed(0)
    make, x_shape, out_shape = LAYERS[name]
    check_paths(Head(make(), out_shape), readout, {"x": torch.randn(x_shape)})
    assert calls  # the route was taken


def test_ghost_norms_taken_a_few_samples_at_a_time_are_the_formed_gradients_norms(monkeypatch):
    """The ghost norm's per-sample products in chunks of samples (two at a time here, as a GPU short of memory or
    a CPU's cache-sized blocks would take them): a linear layer's, an embedding's (one-hot rows) and a tied
    weight's cross terms all equal the norms of the formed per-sample gradients (float64)."""
    g = torch.Generator().manual_seed(0)
    b, t, rows, cols = 5, 7, 6, 4
    shape = torch.Size([rows, cols])
    lin = layer_rules.Factored(torch.randn(b, t, rows, generator=g, dtype=torch.float64),
                               torch.randn(b, t, cols, generator=g, dtype=torch.float64), rows, shape)
    emb = layer_rules.Factored(torch.randint(0, rows, (b, t), generator=g),
                               torch.randn(b, t, cols, generator=g, dtype=torch.float64), rows, shape)
    uses = {"linear": [lin], "embedding": [emb], "tied": [lin, emb]}
    want = {k: layer_rules._sq_rows(sum(layer_rules.dense(f) for f in fs)) for k, fs in uses.items()}
    monkeypatch.setattr(layer_rules, "per_sample_cheaper", lambda *_: False)  # the ghost route, not the formed one
    monkeypatch.setattr(layer_rules, "_ghost_samples", lambda x, tp, tq: 2)
    for name, parts in uses.items():
        torch.testing.assert_close(layer_rules.sq_norms(parts), want[name], rtol=1e-12, atol=1e-12)


def test_dp_memory_budgets_on_a_gpu_stay_within_the_process_cap(monkeypatch):
    """A run sharing a GPU (sweep --jobs) is capped at a fraction of its memory: the DP buffers are sized from
    what the cap leaves, not from the device's free memory its neighbours may take (CUDA stood in for)."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * gib, 140 * gib))
    from torch.cuda._utils import _get_device_index

    # torch's own index checks: the cap's getter refuses a device without an index
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction",
                        lambda device=None: 0.25 + 0 * _get_device_index(device, optional=False))

    def stats(allocated, reserved):  # the allocator's statistics as torch nests them
        return lambda device=None: {"allocated_bytes": {"all": {"current": allocated}},
                                    "reserved_bytes": {"all": {"current": reserved}}, "num_alloc_retries": 0}

    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", stats(5 * gib, 5 * gib))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cuda = torch.device("cuda", 0)
    assert free_memory_bytes(cuda) == 30 * gib  # 0.25 x 140 - 5, below the device's 100 free
    assert free_memory_bytes(torch.device("cuda")) == free_memory_bytes("cuda") == 30 * gib  # the current one
    assert per_sample._formed_budget(cuda) == per_sample.FORMED_SHARE * 30 * gib
    a = __import__("types").SimpleNamespace(device=cuda, shape=(1000, 3, 32, 32))  # a batch's activations
    assert layer_rules._samples_per_product(a, gib) == int(layer_rules.PATCH_MEMORY_SHARE * 30)
    v = __import__("types").SimpleNamespace(device=cuda, shape=(1000, 1024, 768), element_size=lambda: 4)
    blocks = 3 * 1024 * 1024 * 4  # a sample's two [T, T] Gram blocks and their product, float32
    assert layer_rules._ghost_samples(v, 1024, 1024) == int(layer_rules.GHOST_MEMORY_SHARE * 30 * gib // blocks)
    assert layer_rules._ghost_samples(v, 8, 8) == 1000  # at most the batch
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0)
    assert free_memory_bytes(cuda) == 100 * gib  # no cap: the device's free memory
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", stats(5 * gib, 25 * gib))
    assert free_memory_bytes(cuda) == 120 * gib  # and what its own allocator holds unused (25 - 5)


def test_the_tapes_parameter_lists_are_named_parameters_without_its_walk():
    """A module without submodules lists its parameters from its own dict (no None: a layer without bias); any
    other module through named_parameters: the same names and tensors, duplicates kept, on every module of a
    model with tied weights, attention, norm layers and bias-free layers."""
    from goldenpath.dp.tape import parameters_of

    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.MultiheadAttention(4, 2), nn.LayerNorm(4),
                          nn.GroupNorm(2, 4), Tied(9, 4))
    model.append(model[0])  # one module twice
    for module in model.modules():
        assert [(n, id(p)) for n, p in parameters_of(module)] == \
            [(n, id(p)) for n, p in module.named_parameters(remove_duplicate=False)], type(module).__name__
