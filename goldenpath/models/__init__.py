"""Models by name: a small CNN, a fully-connected net, ResNet-18 for 32x32 images, a small ViT, and GPT-2
and Llama causal LMs.

Each family is a frozen dataclass registered with ``@model_family(name)`` whose fields are the YAML keys
``model.<field>``; its ``build(info)`` returns an ``nn.Module`` for a source described by ``info``
(``goldenpath.data.SourceInfo``). Vision models map images [B, C, H, W] to logits [B, classes]; language
models map token ids [B, T] to logits [B, T, vocab]. The language models are transformers' own
implementations built from a config (no download).

:func:`build_model` seeds the initialisation without touching the caller's global RNG;
:func:`sample_losses` is the one loss used for training, evaluation and per-sample clipping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from goldenpath.config import ModelConfig, model_family, require
from goldenpath.data.streams import Batch, SourceInfo
from goldenpath.seeding import Purpose, seeded_generator


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)  # 8 groups where the width allows
    return nn.Identity()


CHANNELS_LAST_DEVICES = ("cpu",)  # device types whose convolutional nets run channels-last (see channels_last)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """Images [B, C, H, W] in channels-last memory on the device types of CHANNELS_LAST_DEVICES (the same
    values; any other tensor as it is).

    oneDNN's convolutions and the channels-last max-pool kernel are several times faster on a CPU than their
    channels-first forms, and the layers after a convolution keep its output's layout, so converting the input
    makes the whole network channels-last (docs/performance.md, "Convolutions on a CPU"; bench/conv_layout.py).
    The weights keep their layout (checkpoints, DDP buckets and views are unchanged). Left alone under
    torch.func's transforms (no channels-last copy inside vmap) and under torch.compile (inductor picks its own
    layouts). A GPU keeps channels-first until it is measured there (bench/gpu.sh's layout part)."""
    if x.dim() != 4 or x.device.type not in CHANNELS_LAST_DEVICES or torch.compiler.is_compiling() \
            or torch._C._functorch.is_functorch_wrapped_tensor(x):
        return x
    return x.contiguous(memory_format=torch.channels_last)


class CNN(nn.Sequential):
    """The small CNN's layers in order (a Sequential: the same state-dict names), channels-last on a CPU
    (:func:`channels_last`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, *rest = self
        x = _first_conv(first, x)
        for layer in rest:
            x = layer(x)
        return x


def _first_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` channels-last (:func:`channels_last`): its input, and its output too, since a one-channel
    image (gray) is both layouts at once and a convolution then answers channels-first."""
    return channels_last(conv(channels_last(x)))


def _require_task(info: SourceInfo, task: str, model: str) -> None:
    require(info.task == task, "model.name", f"{model} needs {task} data but the source is {info.task}",
            "pick a model that matches data.source")


# ----------------------------------------------------------------------------- small CNN

@model_family("cnn")
@dataclass(frozen=True)
class CNNConfig(ModelConfig):
    """``depth`` blocks of conv3x3 -> norm -> ReLU (-> 2x2 max-pool while larger than 4x4), then a linear head."""

    name: str = "cnn"
    width: int = 32                               # channels of every conv layer
    depth: int = 3                                # conv blocks
    norm: Literal["none", "batch", "group"] = "none"

    def check(self) -> None:
        require(self.width >= 1, "model.width", f"got {self.width}", "use >= 1 channel")
        require(self.depth >= 1, "model.depth", f"got {self.depth}", "use >= 1 block")

    def build(self, info: SourceInfo) -> nn.Module:
        _require_task(info, "classification", "cnn")
        c, h, _ = info.input_shape
        layers: list[nn.Module] = []
        for _ in range(self.depth):
            layers += [nn.Conv2d(c, self.width, 3, padding=1, bias=self.norm == "none"),
                       _norm(self.norm, self.width), nn.ReLU()]
            if h >= 8:
                layers.append(nn.MaxPool2d(2))
                h //= 2
            c = self.width
        layers += [nn.AdaptiveAvgPool2d(min(h, 4)), nn.Flatten(), nn.Linear(c * min(h, 4) ** 2, info.num_classes)]
        return CNN(*layers)


# ----------------------------------------------------------------------------- fully-connected net

@model_family("mlp")
@dataclass(frozen=True)
class MLPConfig(ModelConfig):
    """Flatten, then ``depth`` hidden layers of ``width`` units with ReLU, then a linear head."""

    name: str = "mlp"
    width: int = 128
    depth: int = 2

    def check(self) -> None:
        require(self.width >= 1, "model.width", f"got {self.width}", "use >= 1 unit")
        require(self.depth >= 0, "model.depth", f"got {self.depth}", "use >= 0 hidden layers")

    def build(self, info: SourceInfo) -> nn.Module:
        _require_task(info, "classification", "mlp")
        layers: list[nn.Module] = [nn.Flatten()]
        d = math.prod(info.input_shape)
        for _ in range(self.depth):
            layers += [nn.Linear(d, self.width), nn.ReLU()]
            d = self.width
        return nn.Sequential(*layers, nn.Linear(d, info.num_classes))


# ----------------------------------------------------------------------------- ResNet-18 (32x32 stem)

class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(norm, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with a 3x3 stride-1 stem (no max-pool), as used for 32x32 images."""

    def __init__(self, blocks: tuple[int, ...], width: int, norm: str, in_channels: int, classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = _norm(norm, width)
        stages, c = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            stages.append(nn.Sequential(*[BasicBlock(c if j == 0 else c_out, c_out, 2 if i and j == 0 else 1, norm)
                                          for j in range(n)]))
            c = c_out
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(_first_conv(self.conv1, x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@model_family("resnet18")
@dataclass(frozen=True)
class ResNet18Config(ModelConfig):
    name: str = "resnet18"
    width: int = 64                               # channels of the first stage (then x2, x4, x8)
    norm: Literal["batch", "group"] = "batch"     # group: GroupNorm(8), required for DP-SGD

    def check(self) -> None:
        require(self.width >= 1, "model.width", f"got {self.width}", "use >= 1 channel")

    def build(self, info: SourceInfo) -> nn.Module:
        _require_task(info, "classification", "resnet18")
        return ResNet((2, 2, 2, 2), self.width, self.norm, info.input_shape[0], info.num_classes)


# ----------------------------------------------------------------------------- ViT

class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)); x + mlp(ln(x)). Plain layers, so per-sample rules apply."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, mlp_ratio * width), nn.Linear(mlp_ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig, info: SourceInfo):
        super().__init__()
        c, h, w = info.input_shape
        n_patches = (h // cfg.patch_size) * (w // cfg.patch_size)
        self.patch = nn.Conv2d(c, cfg.width, cfg.patch_size, cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, cfg.width) * 0.02)
        self.blocks = nn.Sequential(*[Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.ln = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, info.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        return self.head(self.ln(self.blocks(x))[:, 0])


@model_family("vit")
@dataclass(frozen=True)
class ViTConfig(ModelConfig):
    name: str = "vit"
    width: int = 192
    depth: int = 6
    heads: int = 3
    patch_size: int = 4
    mlp_ratio: int = 4

    def check(self) -> None:
        require(self.width >= 1, "model.width", f"got {self.width}", "use a positive width")
        require(self.depth >= 1, "model.depth", f"got {self.depth}", "use a positive depth")
        require(self.heads >= 1 and self.width % self.heads == 0, "model.heads",
                f"{self.heads} does not divide model.width={self.width}", "pick heads that divide width")
        require(self.patch_size >= 1, "model.patch_size", f"got {self.patch_size}", "use >= 1 pixel")
        require(self.mlp_ratio >= 1, "model.mlp_ratio", f"got {self.mlp_ratio}", "use a positive MLP width ratio")

    def build(self, info: SourceInfo) -> nn.Module:
        _require_task(info, "classification", "vit")
        require(info.input_shape[1] % self.patch_size == 0, "model.patch_size",
                f"{self.patch_size} does not divide the image size {info.input_shape[1]}", "pick a divisor")
        return ViT(self, info)


# ----------------------------------------------------------------------------- causal LMs (transformers)

class CausalLM(nn.Module):
    """A transformers causal LM returning plain logits [B, T, vocab]; given ``labels``, per-token losses and
    top-1 errors [B, T] instead, through the chunked head of :mod:`goldenpath.models.lm_loss` when
    ``loss_chunk_tokens`` is set (the full float32 logits are never held)."""

    def __init__(self, lm: nn.Module, loss_chunk_tokens: int | None = None):
        super().__init__()
        self.lm = lm
        self.loss_chunk_tokens = loss_chunk_tokens

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        if labels is not None:  # through forward, so DDP and a compiled module see the call
            from goldenpath.models.lm_loss import causal_lm_losses

            return causal_lm_losses(self, input_ids, labels, chunk_tokens=self.loss_chunk_tokens,
                                    grad_in_forward=True)
        # Explicit [B, T] positions: every sample's position-embedding lookup is its own (per-sample gradients).
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self.lm(input_ids=input_ids, position_ids=positions, use_cache=False).logits


CAUSAL_SDPA = "goldenpath_causal_sdpa"


def attn_implementation(attention: str) -> str:
    """The transformers attention implementation for ``model.attention``.

    "sdpa" is transformers' own SDPA function under a name of ours with no mask function registered, so the
    model builds no attention mask and SDPA runs with ``is_causal=True`` (its fused kernels). Under the name
    "sdpa" transformers first checks the position ids for packed sequences, a read of a device value (a wait
    for the GPU) in every forward; goldenpath feeds whole sequences, each positioned 0..T-1, so that check can
    only say "none" and the two give the same logits. "eager" is transformers' eager attention, with its mask.
    """
    if attention != "sdpa":
        return attention
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)  # idempotent: a dict entry
    return CAUSAL_SDPA


@dataclass(frozen=True)
class _LMConfig(ModelConfig):
    width: int = 128                  # embedding size
    depth: int = 2                    # transformer blocks
    heads: int = 4
    tie_embeddings: bool = True       # share the token embedding with the output layer
    attention: Literal["sdpa", "eager"] = "sdpa"   # sdpa: causal SDPA; eager works under torch.func.vmap
    loss_chunk_tokens: int | None = None  # lm head + cross-entropy this many tokens at a time (None: full logits)

    def check(self) -> None:
        require(self.width >= 1, "model.width", f"got {self.width}", "use a positive width")
        require(self.depth >= 1, "model.depth", f"got {self.depth}", "use a positive depth")
        require(self.heads >= 1 and self.width % self.heads == 0, "model.heads",
                f"{self.heads} does not divide model.width={self.width}", "pick heads that divide width")
        require(self.loss_chunk_tokens is None or self.loss_chunk_tokens >= 1, "model.loss_chunk_tokens",
                f"got {self.loss_chunk_tokens}", "use a positive number of tokens, or null for the full logits")

    def _special(self, info: SourceInfo) -> dict:
        # transformers' defaults (50256, ...) lie outside small vocabularies.
        return {"bos_token_id": info.num_classes - 1, "eos_token_id": info.num_classes - 1, "pad_token_id": None}


@model_family("gpt2")
@dataclass(frozen=True)
class GPT2Config(_LMConfig):
    name: str = "gpt2"

    def build(self, info: SourceInfo) -> nn.Module:
        import transformers

        _require_task(info, "lm", "gpt2")
        config = transformers.GPT2Config(
            vocab_size=info.num_classes, n_positions=info.input_shape[0], n_embd=self.width, n_layer=self.depth,
            n_head=self.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            # GPT-2's tanh-approximate GELU as one fused kernel (F.gelu(approximate="tanh")): transformers'
            # default "gelu_new" composes the same function from seven elementwise operations, each a pass
            # over the MLP's widest activations, forward and backward (the same logits within float rounding)
            activation_function="gelu_pytorch_tanh",
            tie_word_embeddings=self.tie_embeddings, **self._special(info))
        config._attn_implementation = attn_implementation(self.attention)
        return CausalLM(transformers.GPT2LMHeadModel(config), self.loss_chunk_tokens)


@model_family("llama")
@dataclass(frozen=True)
class LlamaConfig(_LMConfig):
    name: str = "llama"
    kv_heads: int | None = None       # grouped-query attention; None: as many as heads
    mlp_width: int | None = None      # SwiGLU hidden size; None: 8/3 x width rounded up to a multiple of 8
    tie_embeddings: bool = False

    def check(self) -> None:
        super().check()
        require(self.kv_heads is None or self.kv_heads >= 1, "model.kv_heads", f"got {self.kv_heads}",
                "use a positive number of key-value heads, or null (as many as heads)")
        require(self.mlp_width is None or self.mlp_width >= 1, "model.mlp_width", f"got {self.mlp_width}",
                "use a positive width, or null (8/3 x width)")
        kv = self.kv_heads or self.heads
        require(self.heads % kv == 0, "model.kv_heads", f"{kv} does not divide model.heads={self.heads}",
                "pick kv_heads dividing heads")

    def build(self, info: SourceInfo) -> nn.Module:
        import transformers

        _require_task(info, "lm", "llama")
        mlp = self.mlp_width or 8 * math.ceil(8 * self.width / 3 / 8)
        config = transformers.LlamaConfig(
            vocab_size=info.num_classes, hidden_size=self.width, intermediate_size=mlp,
            num_hidden_layers=self.depth, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads or self.heads, max_position_embeddings=info.input_shape[0],
            tie_word_embeddings=self.tie_embeddings, **self._special(info))
        config._attn_implementation = attn_implementation(self.attention)
        return CausalLM(transformers.LlamaForCausalLM(config), self.loss_chunk_tokens)


# ----------------------------------------------------------------------------- building and losses

def build_model(config: ModelConfig, info: SourceInfo, *, seed: int) -> nn.Module:
    """The model of ``config`` for ``info``, initialised from ``seed`` on the CPU (the global RNGs are left
    untouched: the CPU generator is seeded inside a fork of its state, and no CUDA generator is)."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(
            int(torch.randint(2**62, (1,), generator=seeded_generator(seed, Purpose.INIT))))
        return config.build(info)


def logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Model outputs for a batch: [B, classes] for images, [B, T, vocab] for text."""
    return model(batch["x"]) if "x" in batch else model(batch["input_ids"])


def output_layer(model: nn.Module) -> nn.Module:
    """The layer mapping the penultimate features to logits: its input is what representation measures read
    ([B, d] for images, [B, T, d] per token for text; linear CKA in goldenpath.comparison.pairs hooks it)."""
    if isinstance(model, CausalLM):
        return model.lm.get_output_embeddings()
    if isinstance(model, nn.Sequential):
        return model[-1]
    for name in ("fc", "head"):  # ResNet, ViT
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    raise TypeError(f"{type(model).__name__} has no known output layer (a Sequential's last, fc or head)")


def sample_losses(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-sample summed cross-entropy [B] (a sequence sums its predicted tokens; labels -100 are skipped).

    The training loss of a logical batch is ``sample_losses(...).sum() / count(batch)`` summed over its
    micro-batches and processes, so every token (or image) weighs the same however the batch is split.
    """
    chunked = _chunked_losses(model, batch)
    return chunked[0] if chunked else _losses(logits(model, batch), batch)


def _chunked_losses(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-sequence summed losses and errors [B] from a CausalLM's chunked head, or None when the model has
    none (images, or ``model.loss_chunk_tokens`` null)."""
    inner = getattr(model, "module", model)  # under DDP (goldenpath compiles in place: no wrapper to look through)
    if "x" in batch or getattr(inner, "loss_chunk_tokens", None) is None:
        return None
    losses, errors = model(batch["input_ids"], labels=batch["labels"])
    return losses.sum(1), errors.sum(1).to(torch.float64)


def _losses(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out  # losses in fp32 or better
    if "y" in batch:
        return F.cross_entropy(out, batch["y"], reduction="none")
    labels = batch["labels"]
    token = F.cross_entropy(out.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100)
    return token.view(labels.shape).sum(1)


def sample_losses_and_errors(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed cross-entropy and top-1 errors [B] (a sequence counts its wrongly predicted tokens)."""
    chunked = _chunked_losses(model, batch)
    if chunked:
        return chunked
    out = logits(model, batch)
    if "y" in batch:
        errors = (out.argmax(-1) != batch["y"]).to(torch.float64)
    else:
        labels = batch["labels"]
        errors = ((out.argmax(-1) != labels) & (labels != -100)).sum(1).to(torch.float64)
    return _losses(out, batch), errors


def count(batch: Batch) -> int:
    """Loss units in a batch: images, or predicted tokens (labels != -100)."""
    return len(batch["y"]) if "y" in batch else int((batch["labels"] != -100).sum())
