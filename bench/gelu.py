"""GPT-2's GELU as goldenpath builds it (one fused kernel) against transformers' default form (seven elementwise
operations), in an eager training step of goldenpath's GPT-2, measured in the same run.

    python bench/gelu.py [--width 256] [--depth 4] [--batch 8] [--seq 256] [--vocab 8192] [--reps 7]
                         [--device cpu]

Both models have the same weights; a step is forward, cross-entropy, backward (no optimizer), bf16 autocast on
CUDA. Steps alternate between the two forms; the figure is the median step time, fused / composed (< 1: the
fused form is faster), and the largest difference of their losses (the same function: float rounding).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def models(width: int, depth: int, vocab: int, seq: int, device: str) -> dict:
    """{"fused": goldenpath's GPT-2, "composed": the same weights with transformers' default "gelu_new"}."""
    import transformers

    from goldenpath.config import load_config
    from goldenpath.data import SourceInfo
    from goldenpath.models import build_model

    config = load_config(None, ["data.source=markov", "model.name=gpt2", f"model.width={width}",
                                f"model.depth={depth}", f"model.heads={max(1, width // 64)}"]).model
    fused = build_model(config, SourceInfo("lm", (seq,), vocab), seed=0)
    composed_config = transformers.GPT2Config(**{**fused.lm.config.to_dict(), "activation_function": "gelu_new"})
    composed_config._attn_implementation = fused.lm.config._attn_implementation
    composed = transformers.GPT2LMHeadModel(composed_config)
    composed.load_state_dict(fused.lm.state_dict())
    return {"fused": fused.lm.to(device), "composed": composed.to(device)}


def measure(*, width: int = 256, depth: int = 4, batch: int = 8, seq: int = 256, vocab: int = 8192, reps: int = 7,
            device: str = "cpu") -> dict:
    nets = models(width, depth, vocab, seq, device)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.arange(seq, device=device).expand_as(ids)

    def step(net) -> float:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = net(input_ids=ids, position_ids=positions, use_cache=False).logits
        loss = F.cross_entropy(logits.float()[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        net.zero_grad(set_to_none=True)
        loss.backward()
        return float(loss.detach())

    times: dict[str, list[float]] = {k: [] for k in nets}
    losses = {k: step(net) for k, net in nets.items()}  # warm-up
    for _ in range(reps):
        for k, net in nets.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(net)
            if device == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(t) for k, t in times.items()}
    return {"fused_ms": 1e3 * med["fused"], "composed_ms": 1e3 * med["composed"],
            "ratio": med["fused"] / med["composed"], "loss_difference": abs(losses["fused"] - losses["composed"])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192, help="the lm head's size (GPT-2's: 50257)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    r = measure(width=args.width, depth=args.depth, batch=args.batch, seq=args.seq, vocab=args.vocab,
                reps=args.reps, device=args.device)
    print(f"GPT-2 eager step, width {args.width}, depth {args.depth}, {args.batch} x {args.seq} tokens, "
          f"vocabulary {args.vocab} ({args.device}, torch {torch.__version__}): fused GELU {r['fused_ms']:.1f} ms, "
          f"composed {r['composed_ms']:.1f} ms; fused / composed = {r['ratio']:.2f}; losses differ by "
          f"{r['loss_difference']:.1e}")


if __name__ == "__main__":
    main()
