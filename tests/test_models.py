"""Models: shapes, known parameter counts, seeded initialisation, and the loss against torch's reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from goldenpath.config import ConfigError, load_config
from goldenpath.data import SourceInfo
from goldenpath import models
from goldenpath.models import build_model, count, sample_losses

IMAGES = SourceInfo("classification", (3, 32, 32), 10)
TEXT = SourceInfo("lm", (16,), 50)


def model_config(*overrides):
    return load_config(None, [*overrides, "budget.steps=1"]).model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("overrides", [
    ["model.name=cnn"], ["model.name=cnn", "model.norm=group"], ["model.name=cnn", "model.norm=batch"],
    ["model.name=resnet18", "model.width=8"], ["model.name=resnet18", "model.width=8", "model.norm=group"],
    ["model.name=vit", "model.width=32", "model.depth=2", "model.heads=4"],
    ["model.name=mlp", "model.width=16", "model.depth=3"],
])
def test_vision_models_map_images_to_class_logits(overrides):
    model = build_model(model_config(*overrides), IMAGES, seed=0)
    assert model(torch.randn(5, 3, 32, 32)).shape == (5, 10)
    gray = build_model(model_config(*overrides), SourceInfo("classification", (1, 28, 28), 10), seed=0)
    assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("overrides", [
    ["model.name=cnn", "model.width=8"], ["model.name=cnn", "model.width=8", "model.norm=group"],
    ["model.name=resnet18", "model.width=8"], ["model.name=resnet18", "model.width=8", "model.norm=group"],
])
@pytest.mark.parametrize("channels", [3, 1])
def test_convolutional_nets_run_channels_last_on_a_cpu_and_compute_the_same(overrides, channels, monkeypatch):
    """The CNN and ResNet-18 run channels-last on a CPU (oneDNN's fast layout): every convolution after the first
    sees channels-last inputs (the first too, unless its one-channel input is both layouts at once), the logits
    and parameter gradients are those of the same network run channels-first (float64), and the gradients keep
    the weights' own layout (checkpoints, DDP buckets)."""
    model = build_model(model_config(*overrides), SourceInfo("classification", (channels, 32, 32), 10),
                        seed=0).double()
    x, y = torch.randn(6, channels, 32, 32, dtype=torch.float64), torch.randint(0, 10, (6,))
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.append(args[0])) for m in model.modules()
             if isinstance(m, torch.nn.Conv2d)]
    out = model(x)
    for h in hooks:
        h.remove()
    assert len(seen) > 1 and all(a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous()
                                 for a in (seen if channels > 1 else seen[1:]))
    F.cross_entropy(out, y).backward()
    got = {n: p.grad for n, p in model.named_parameters()}
    assert all(g.stride() == p.stride() for g, p in zip(got.values(), model.parameters()))

    model.zero_grad()
    monkeypatch.setattr(models, "CHANNELS_LAST_DEVICES", ())  # channels-first, as a GPU runs them
    first = model(x)
    F.cross_entropy(first, y).backward()
    assert torch.allclose(out, first, rtol=1e-12, atol=1e-12)
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-10, atol=1e-12), n


def test_per_sample_gradients_under_vmap_leave_the_layout_alone():
    """Inside torch.func's vmap (DP-SGD's reference path) a channels-last copy is not possible: the CNN runs
    channels-first there, and vmap's per-sample gradients equal a loop's."""
    from torch.func import functional_call, grad, vmap

    model = build_model(model_config("model.name=cnn", "model.width=4", "model.norm=group"), IMAGES, seed=0).double()
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (3,))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(ps, xi, yi):
        return F.cross_entropy(functional_call(model, ps, (xi[None],)), yi[None])

    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):
        one = torch.autograd.grad(loss(dict(model.named_parameters()), x[i], y[i]), list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), one):
            assert torch.allclose(batched[n][i], g, rtol=1e-10, atol=1e-13), n


def test_resnet18_has_the_published_parameter_count():
    # ResNet-18 for CIFAR-10 (3x3 stem, widths 64-512): 11,173,962 parameters.
    assert n_params(build_model(model_config("model.name=resnet18"), IMAGES, seed=0)) == 11_173_962
    norms = {type(m).__name__ for m in build_model(model_config("model.name=resnet18", "model.norm=group"),
                                                     IMAGES, seed=0).modules()}
    assert "GroupNorm" in norms and "BatchNorm2d" not in norms


def test_mlp_has_depth_hidden_layers_of_width_units():
    model = build_model(model_config("model.name=mlp", "model.width=16", "model.depth=3"), IMAGES, seed=0)
    assert n_params(model) == (3072 * 16 + 16) + 2 * (16 * 16 + 16) + (16 * 10 + 10)


def test_gpt2_small_has_the_published_parameter_count():
    info = SourceInfo("lm", (1024,), 50257)
    model = build_model(model_config("data.source=markov", "model.name=gpt2", "model.width=768", "model.depth=12",
                                     "model.heads=12"), info, seed=0)
    assert n_params(model) == 124_439_808  # GPT-2 small, tied embeddings
    assert model.lm.lm_head.weight is model.lm.transformer.wte.weight


def test_gpt2_is_transformers_gpt2_with_its_gelu_in_one_kernel():
    # The same weights in transformers' GPT-2 as configured by default ("gelu_new", the tanh-approximate GELU
    # from seven elementwise ops) give the same logits in float64; goldenpath's runs F.gelu(approximate="tanh").
    import transformers

    model = build_model(model_config("data.source=markov", "model.name=gpt2", "model.width=32", "model.heads=4"),
                        TEXT, seed=0).double()
    reference_config = transformers.GPT2Config(**{**model.lm.config.to_dict(), "activation_function": "gelu_new"})
    reference_config._attn_implementation = "eager"
    reference = transformers.GPT2LMHeadModel(reference_config).double()
    reference.load_state_dict(model.lm.state_dict())
    ids = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, rtol=0, atol=1e-12)
    with torch.profiler.profile() as prof, torch.no_grad():
        model(ids)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::gelu" in ops and "aten::tanh" not in ops


@pytest.mark.parametrize("name, extra", [("gpt2", []), ("gpt2", ["model.tie_embeddings=false"]),
                                         ("llama", ["model.kv_heads=2"]), ("llama", ["model.attention=eager"])])
def test_language_models_map_tokens_to_vocab_logits(name, extra):
    model = build_model(model_config("data.source=markov", f"model.name={name}", "model.width=32",
                                     "model.heads=4", *extra), TEXT, seed=0)
    ids = torch.randint(0, 50, (3, 16))
    out = model(ids)
    assert out.shape == (3, 16, 50)
    # causal: changing a later token leaves earlier logits unchanged
    ids2 = ids.clone()
    ids2[:, 10] = (ids2[:, 10] + 1) % 50
    assert torch.allclose(model(ids2)[:, :10], out[:, :10], atol=1e-5)
    assert not torch.allclose(model(ids2)[:, 10:], out[:, 10:], atol=1e-5)


def test_llama_grouped_query_attention_and_mlp_width():
    model = build_model(model_config("data.source=markov", "model.name=llama", "model.width=48", "model.heads=4",
                                     "model.kv_heads=2"), TEXT, seed=0)
    attn = model.lm.model.layers[0].self_attn
    assert attn.k_proj.out_features == 2 * 12 and attn.q_proj.out_features == 48
    assert model.lm.model.layers[0].mlp.gate_proj.out_features == 128  # 8/3 x 48, rounded up to 8


def test_initialisation_is_seeded_and_leaves_the_global_rng_alone():
    cfg = model_config()
    before = torch.get_rng_state()
    a, b, c = (build_model(cfg, IMAGES, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_model_and_data_must_match():
    with pytest.raises(ConfigError, match="model.name"):
        build_model(model_config("model.name=gpt2"), IMAGES, seed=0)
    with pytest.raises(ConfigError, match="model.patch_size"):
        build_model(model_config("model.name=vit", "model.patch_size=5"), IMAGES, seed=0)


def test_classification_loss_matches_torch_mean():
    model = build_model(model_config("model.width=4"), IMAGES, seed=0).double()
    batch = {"x": torch.randn(6, 3, 32, 32, dtype=torch.float64), "y": torch.randint(0, 10, (6,))}
    losses = sample_losses(model, batch)
    assert losses.shape == (6,) and count(batch) == 6
    assert torch.allclose(losses.sum() / count(batch), F.cross_entropy(model(batch["x"]), batch["y"]), rtol=1e-12)


def test_lm_loss_sums_tokens_per_sequence_and_skips_padding():
    model = build_model(model_config("data.source=markov", "model.name=gpt2", "model.width=16", "model.heads=2"),
                        TEXT, seed=0).double()
    ids = torch.randint(0, 50, (4, 16))
    labels = torch.randint(0, 50, (4, 16))
    labels[1, 9:] = -100
    labels[3, 2:] = -100
    batch = {"input_ids": ids, "labels": labels}
    losses = sample_losses(model, batch)
    assert count(batch) == 16 + 9 + 16 + 2
    reference = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert torch.allclose(losses.sum() / count(batch), reference, rtol=1e-12)
    row = F.cross_entropy(model(ids[3:4])[0, :2], labels[3, :2], reduction="sum")
    assert torch.allclose(losses[3], row, rtol=1e-12)


def test_building_a_model_leaves_the_cuda_generators_alone(monkeypatch):
    """torch.manual_seed also seeds every CUDA generator, which the CPU-only fork of the RNG state does not
    restore: a caller drawing on a GPU after build_model drew from a reseeded generator."""
    from goldenpath.config import load_config
    from goldenpath.data import SourceInfo
    from goldenpath.models import build_model

    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: seeded.append(s))
    config = load_config(None, ["model.name=cnn", "model.width=4", "model.depth=1"]).model
    a = build_model(config, SourceInfo("classification", (3, 8, 8), 10), seed=3)
    b = build_model(config, SourceInfo("classification", (3, 8, 8), 10), seed=3)
    assert seeded == [] and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
