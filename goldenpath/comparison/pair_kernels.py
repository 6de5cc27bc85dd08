"""tv and js of many pairs of models in one Triton kernel that reads each pair's log-probabilities once (CUDA).

The eager forms (:mod:`goldenpath.comparison.distances`) take some ten passes over a pair's [points, classes]
distributions for tv and js together, each a kernel of its own; at GPT-2's vocabulary they are most of
``compare``'s time on a GPU. Here one program takes one pair and a few points and streams both models' rows
through the classes once, keeping the running sums in registers:

    tv = 1/2 sum_k |p_k - q_k|,   js = 1/2 sum_k [p_k (log p_k - log m_k) + q_k (log q_k - log m_k)],  m = (p + q) / 2

with 0 log(0 / m) = 0 (a token a model rules out adds nothing) and m held at or above the smallest normal float
(such a token weighs < 1e-37), js clamped to [0, ln 2] as the eager form is. Programs take the pairs fastest,
so the pairs of one block of points run together and read their models' rows from the GPU's L2 cache. Within a
float32 rounding of the eager forms (``tests/test_pair_kernels.py`` runs the kernel in Triton's interpreter on a CPU).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

TILE = 4096  # a program's [points, classes] tile (8 warps: 16 values a thread): up to 512 classes a step of its
# loop, as many points as fill it


@triton.jit
def _tv_js_kernel(log_p, first, second, tv_out, js_out, n_pairs, n_points, n_classes,
                  POINTS: tl.constexpr, CLASSES: tl.constexpr):
    pair = tl.program_id(0) % n_pairs  # pairs fastest: the pairs of a block of points run together
    block = tl.program_id(0) // n_pairs
    i = tl.load(first + pair).to(tl.int64)
    j = tl.load(second + pair).to(tl.int64)
    points = block.to(tl.int64) * POINTS + tl.arange(0, POINTS).to(tl.int64)
    live = points < n_points
    row_i = log_p + (i * n_points + points)[:, None] * n_classes
    row_j = log_p + (j * n_points + points)[:, None] * n_classes
    tv = tl.zeros((POINTS,), dtype=tl.float32)
    js = tl.zeros((POINTS,), dtype=tl.float32)
    for lo in range(0, n_classes, CLASSES):
        k = lo + tl.arange(0, CLASSES)
        inside = live[:, None] & (k < n_classes)[None, :]
        a = tl.load(row_i + k[None, :], mask=inside, other=-float("inf"))
        b = tl.load(row_j + k[None, :], mask=inside, other=-float("inf"))
        p = tl.exp(a)
        q = tl.exp(b)
        tv += tl.sum(tl.abs(p - q), axis=1)
        log_m = tl.log(tl.maximum(p + (q - p) * 0.5, 1.1754943508222875e-38))
        terms = p * tl.where(p > 0, a - log_m, 0.0) + q * tl.where(q > 0, b - log_m, 0.0)  # no 0 * inf
        js += tl.sum(terms, axis=1)
    out = pair.to(tl.int64) * n_points + points
    tl.store(tv_out + out, tv * 0.5, mask=live)
    tl.store(js_out + out, tl.minimum(tl.maximum(js * 0.5, 0.0), 0.6931471805599453), mask=live)


def tv_js(log_p: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tv, js), each [pairs, *lead], of the pairs of models (first[k], second[k]) whose log-probabilities
    ``log_p`` [models, *lead, classes] (float32) stacks."""
    models, classes = log_p.shape[0], log_p.shape[-1]
    lead = log_p.shape[1:-1]
    points = math.prod(lead)
    flat = log_p.reshape(models, points, classes).contiguous()
    pairs = len(first)
    tv = flat.new_empty(pairs, points)
    js = flat.new_empty(pairs, points)
    if pairs and points:
        step = min(512, triton.next_power_of_2(classes))
        block = TILE // step
        grid = (pairs * triton.cdiv(points, block),)  # one dimension: up to 2**31 - 1 programs
        # Triton launches on the current device: make it the tensors' (compare --device cuda:1)
        with torch.cuda.device(flat.device) if flat.is_cuda else contextlib.nullcontext():
            _tv_js_kernel[grid](flat, first.to(flat.device, torch.int64).contiguous(),
                                second.to(flat.device, torch.int64).contiguous(), tv, js, pairs, points, classes,
                                POINTS=block, CLASSES=step, num_warps=8)
    return tv.view(pairs, *lead), js.view(pairs, *lead)
