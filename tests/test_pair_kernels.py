"""The Triton kernel for tv and js of every pair (what compare runs on a CUDA GPU) against the eager forms, run by
Triton's interpreter on a CPU in a child process (the interpreter is chosen when triton is imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from goldenpath.comparison import pairs
from goldenpath.comparison.distances import Dist

CHILD = textwrap.dedent("""
    import itertools, json, math
    import torch
    from goldenpath.comparison import pairs
    from goldenpath.comparison.distances import Dist

    def stacked(logits):
        dist = None
        for k in range(len(logits)):
            dist = Dist.stack_into(dist, k, len(logits), Dist(logits[k]))
        return dist

    def sums(dist, unit, mask, kernel):
        pairs.use_kernel = lambda d: kernel
        points = math.prod(dist.log_p.shape[1:-1])
        pairs._copy_bytes = lambda device: 3 * 10 * 4 * points  # the kernel's pairs in groups of 3
        ps = list(itertools.combinations(range(dist.log_p.shape[0]), 2))
        gram = pairs._Gram(dist) if set(unit) & set(pairs._Gram.METRICS) else None
        out = torch.zeros(len(unit), len(ps), dist.log_p.shape[1], dtype=torch.float64)
        for group, s in pairs._pair_groups(dist, ps, unit, mask, gram):
            out[:, list(group)] = s
        return out

    g = torch.Generator().manual_seed(0)
    report = {}
    # a language model: 4 sequences of 9 tokens (one padded), 700 classes (no power of 2), a near-equal pair
    lm = torch.randn(5, 4, 9, 700, generator=g) * 3
    lm[1] = lm[0] + 1e-3 * torch.randn(4, 9, 700, generator=g)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[3, 6:] = False
    masked = lm.clone()
    masked[2, :, :, :50] = -math.inf  # tokens a model rules out: kl leaves the inner-product forms
    masked[3, :, :, 25:75] = -math.inf
    images = torch.randn(6, 37, 10, generator=g) * 2  # 37 images: no whole number of blocks
    cases = {"lm": (lm, mask, ["tv", "kl", "js", "top1", "sq"]),
             "lm ruled-out tokens": (masked, mask, ["tv", "js", "top1"]),
             "images": (images, None, ["tv", "kl", "js", "top1", "sq"])}
    for name, (logits, m, unit) in cases.items():
        dist = stacked(logits)
        eager, fused = sums(dist, unit, m, False), sums(dist, unit, m, True)
        report[name] = {u: [float((fused[k] - eager[k]).abs().max()), float(eager[k].abs().max())]
                        for k, u in enumerate(unit)}
    # a near-equal pair (a thousandth of the logits' scale apart): its small tv to float32 accuracy
    report["near-equal tv"] = [float(sums(stacked(lm), ["tv"], mask, True)[0, 0].sum()),
                               float(sums(stacked(lm), ["tv"], mask, False)[0, 0].sum())]
    print(json.dumps(report))
""")


def test_the_kernel_gives_the_eager_metrics_of_every_pair():
    pytest.importorskip("triton", reason="Triton has wheels for Linux x86-64 alone (the dev extra installs it there)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for case in ("lm", "lm ruled-out tokens", "images"):
        for metric, (gap, scale) in report[case].items():
            assert scale > 0, (case, metric)
            # sums over a unit's points (up to 9 tokens), each within float32 roundings (~1e-7) of the eager value;
            # compare's tolerances are 1e-5 absolute on a point (tv, js), kl 1e-4 relative
            assert gap <= (1e-4 * scale if metric == "kl" else 2e-6 if metric != "top1" else 0), (case, metric, gap)
    fused, eager = report["near-equal tv"]
    assert 0 < eager < 0.1 and abs(fused - eager) < 1e-5 * eager


def test_a_kernel_that_cannot_run_leaves_its_pairs_to_the_eager_forms_with_a_warning(monkeypatch):
    """Triton may fail to compile on a machine (no C compiler for its launcher), or run out of memory part way:
    compare warns, measures the pairs left by the eager forms, and does not try the kernel again in that
    process. Here the kernel gives the first group of two pairs and fails on the second."""
    import types

    from goldenpath.comparison.distances import ON_DISTS

    calls = []

    def kernel(log_p, first, second):
        calls.append(len(first))
        if len(calls) > 1:
            raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")
        a, b = dist.take(first), dist.take(second)
        return ON_DISTS["tv"](a, b), ON_DISTS["js"](a, b)

    monkeypatch.setitem(sys.modules, "goldenpath.comparison.pair_kernels", types.SimpleNamespace(tv_js=kernel))
    monkeypatch.setattr(pairs, "KERNEL_FAILED", [])
    monkeypatch.setattr(pairs, "_copy_bytes", lambda device: 2 * 10 * 4 * 5)  # groups of two pairs of 5 points
    g = torch.Generator().manual_seed(0)
    dist = None
    for k in range(4):
        dist = Dist.stack_into(dist, k, 4, Dist(torch.randn(5, 10, generator=g)))
    ps = [(0, 1), (0, 2), (1, 3), (2, 3), (1, 2)]

    def sums(kernel_on):
        monkeypatch.setattr(pairs, "use_kernel", lambda d: kernel_on)
        out = torch.full((3, len(ps), 5), float("nan"), dtype=torch.float64)
        for group, s in pairs._pair_groups(dist, ps, ["tv", "js", "top1"], None, None):
            out[:, list(group)] = s
        return out

    with pytest.warns(UserWarning, match="Triton kernel for tv and js failed .*C compiler"):
        fallen = sums(True)
    assert calls == [2, 2] and torch.equal(fallen, sums(False))  # every pair measured, once
    assert pairs.KERNEL_FAILED[0].startswith("RuntimeError: Failed to find")
