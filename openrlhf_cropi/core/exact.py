"""Exact influence scores (``--cropi.projector none``): cosines with the full gradients, no projection.

Each validation set's mean gradient t_v is kept per parameter, flat float32 in the parameters'
order (``numels``: their full sizes, which is what autograd yields under ZeRO-3 too). A pool
prompt's cosines come from the per-parameter gradients as autograd streams them: the dot
products <g_s, t_v> and the squared norm |g_s|^2 accumulated parameter by parameter (each in
float32, summed in float64), then cos_v = <g_s, t_v> / (|g_s| |t_v|).

Dot products add up over micro-batches, squared norms do not (|a + b|^2 != |a|^2 + |b|^2): a
prompt whose distinct responses fit one micro-batch is streamed, one that spans several is
first summed into a gradient buffer (one more model-sized float32 vector). Validation prompts
always go through the buffer, so that a non-finite gradient is dropped whole (as the projected
path drops its vector) instead of poisoning the mean. Memory: (V + 1) x 4 bytes per parameter,
V the number of validation sets (``state_bytes``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .advantages import Objective, first_copies
from .gradients import LogProbFn, forward_passes, micro_batch_objectives, stream_gradients

BYTES_PER_PARAMETER = 4  # float32


def state_bytes(num_targets: int, total_params: int) -> int:
    """Bytes an exact scorer holds per rank: the V validation means and the gradient buffer."""
    return (num_targets + 1) * total_params * BYTES_PER_PARAMETER


def flat_zeros(numels: Sequence[int], device: torch.device | str) -> list[torch.Tensor]:
    """One flat float32 zero tensor per parameter: a gradient buffer or a target."""
    return [torch.zeros(n, dtype=torch.float32, device=device) for n in numels]


def _checked(numels: Sequence[int]):
    def check(i: int, grad: torch.Tensor) -> torch.Tensor:
        if grad.numel() != numels[i]:
            raise RuntimeError(f"parameter {i}: gradient of {grad.numel():,} coordinates, expected {numels[i]:,}")
        return grad.reshape(-1).float()

    return check


def gradient_into(
    out: Sequence[torch.Tensor],
    log_prob_fn: LogProbFn,
    params: Sequence[torch.Tensor],
    prompt_ids: torch.Tensor,
    responses: Sequence[torch.Tensor],
    rewards: torch.Tensor | Sequence[float],
    behavior: Sequence[torch.Tensor],
    max_tokens: int,
    device: torch.device | str,
    *,
    truncated: Sequence[bool] | None = None,
    objective: Objective = Objective(),
) -> bool:
    """g_s written into ``out`` (flat float32 per parameter, zeroed here); True when it is finite."""
    flat = _checked([t.numel() for t in out])
    for t in out:
        t.zero_()
    for share in micro_batch_objectives(log_prob_fn, prompt_ids, responses, rewards, behavior, max_tokens, device,
                                        truncated=truncated, objective=objective):  # fmt: skip
        stream_gradients(share, params, lambda i, grad: out[i].add_(flat(i, grad)))
    return bool(torch.stack([torch.isfinite(t).all() for t in out]).all())


def _dots(i: int, g: torch.Tensor, targets: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """[<g, t_v[i]> for each v, <g, g>] of parameter i's gradient g (flat float32), float64."""
    return torch.stack([torch.dot(g, t[i]) for t in targets] + [torch.dot(g, g)]).double()


def gradient_dots(
    targets: Sequence[Sequence[torch.Tensor]],
    buffer: Sequence[torch.Tensor],
    log_prob_fn: LogProbFn,
    params: Sequence[torch.Tensor],
    prompt_ids: torch.Tensor,
    responses: Sequence[torch.Tensor],
    rewards: torch.Tensor | Sequence[float],
    behavior: Sequence[torch.Tensor],
    max_tokens: int,
    device: torch.device | str,
    *,
    truncated: Sequence[bool] | None = None,
    objective: Objective = Objective(),
) -> torch.Tensor:
    """[<g_s, t_1>, ..., <g_s, t_V>, |g_s|^2] (float64, on the targets' device) of one prompt.

    ``targets``: V lists of flat per-parameter tensors; ``buffer``: one such list, used when the
    prompt's distinct responses span several micro-batches. A non-finite gradient makes
    |g_s|^2 non-finite: check the result."""
    flat = _checked([t.numel() for t in buffer])
    first = first_copies(responses)
    passes = forward_passes(len(prompt_ids), [len(r) for r in responses], [f == k for k, f in enumerate(first)],
                            max_tokens)  # fmt: skip
    if passes > 1:
        gradient_into(buffer, log_prob_fn, params, prompt_ids, responses, rewards, behavior, max_tokens, device,
                      truncated=truncated, objective=objective)  # fmt: skip
        return torch.stack([_dots(i, g, targets) for i, g in enumerate(buffer)]).sum(0)
    total = torch.zeros(len(targets) + 1, dtype=torch.float64, device=buffer[0].device)

    def add(i: int, grad: torch.Tensor) -> None:
        total.add_(_dots(i, flat(i, grad), targets))

    for share in micro_batch_objectives(log_prob_fn, prompt_ids, responses, rewards, behavior, max_tokens, device,
                                        truncated=truncated, objective=objective):  # fmt: skip
        stream_gradients(share, params, add)
    return total


def squared_norm(target: Sequence[torch.Tensor]) -> float:
    return float(sum(torch.dot(t, t).double() for t in target))


def cosines_from_dots(dots: torch.Tensor, target_squared_norms: Sequence[float]) -> torch.Tensor:
    """Cosines [..., V] from ``gradient_dots`` results [..., V + 1] (0 where a norm is 0)."""
    tt = torch.as_tensor(target_squared_norms, dtype=torch.float64, device=dots.device)
    norms = (dots[..., -1:].double() * tt).sqrt()
    return torch.where(norms > 0, dots[..., :-1].double() / norms.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
