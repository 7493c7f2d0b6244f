"""Off-policy policy gradient of one prompt (CROPI's g_s), batched within a token budget.

For a prompt s with K stored responses y_k, rewards r_k and behavior log-probs log beta:

    rho_{k,t} = exp(log pi_theta(y_{k,t} | .) - log beta(y_{k,t} | .))
    J(theta)  = (1/K) sum_k (1/|y_k|) sum_t rho_{k,t} A_k        (= -L of the method doc)
    g_s       = grad_theta J                                       (no clipping, no KL term)

Only response tokens count. The K responses are packed into micro-batches of at most
``max_tokens`` padded tokens; J is a sum over responses, so the micro-batch gradients add up
to g_s exactly. Gradients come from ``torch.autograd.grad``: ``.grad`` and the optimizer state
are never touched, so this can run in the middle of training.

The model is reached only through a ``LogProbFn``:

    log_prob_fn(input_ids [B, T], attention_mask [B, T], action_mask [B, A]) -> [B, A]

returning the log-probs of the LAST A tokens of each row (values where action_mask is 0 are
ignored). This is the contract of OpenRLHF's ``Actor.forward(sequences, action_mask=...,
attention_mask=...)``, so the integration passes the Actor; ``causal_lm_log_prob_fn`` is the
same computation for a plain transformers causal LM. Rows are laid out as
``[prompt | response | right padding]`` (one prompt per call, so no left padding is needed).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .advantages import group_advantages, zero_variance

LogProbFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal_lm_log_prob_fn(model: torch.nn.Module, temperature: float = 1.0) -> LogProbFn:
    """LogProbFn for a transformers causal LM: float32 logits / temperature, next-token log-probs.

    Mirrors OpenRLHF's Actor: position ids from the attention mask, logits cast to float32 and
    divided by the sampling temperature. The caller puts the model in eval mode (no dropout).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def log_probs(input_ids: torch.Tensor, attention_mask: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
        num_actions = action_mask.shape[1]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
        # Only the logits that predict the last num_actions tokens are needed.
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=num_actions + 1,
        )
        logits = out.logits[:, :-1].float() / temperature
        targets = input_ids[:, -num_actions:]
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)

    return log_probs


def plan_micro_batches(response_lengths: Sequence[int], prompt_length: int, max_tokens: int) -> list[list[int]]:
    """Group response indices so that rows * (prompt_length + longest response) <= max_tokens.

    Longest responses first (less padding); a response too long for the budget goes alone.
    Deterministic in its inputs, which is what makes behavior log-probs and gradients see
    identical micro-batches (hence rho == 1 bit for bit at theta == beta).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(response_lengths)), key=lambda k: (-response_lengths[k], k))
    batches: list[list[int]] = []
    for k in order:
        # Sorted by length, so the first row of a batch is its longest.
        if batches and (len(batches[-1]) + 1) * (prompt_length + response_lengths[batches[-1][0]]) <= max_tokens:
            batches[-1].append(k)
        else:
            batches.append([k])
    return batches


def pack_micro_batch(
    prompt_ids: torch.Tensor, responses: Sequence[torch.Tensor], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``[prompt | response | pad]``: (input_ids [B,T], attention_mask [B,T], action_mask [B,A])."""
    num_actions = max(len(r) for r in responses)
    p = len(prompt_ids)
    input_ids = torch.zeros(len(responses), p + num_actions, dtype=torch.long)
    action_mask = torch.zeros(len(responses), num_actions, dtype=torch.bool)
    input_ids[:, :p] = prompt_ids
    for i, r in enumerate(responses):
        input_ids[i, p : p + len(r)] = r
        action_mask[i, : len(r)] = True
    attention_mask = torch.cat([torch.ones(len(responses), p, dtype=torch.bool), action_mask], dim=1)
    return input_ids.to(device), attention_mask.long().to(device), action_mask.to(device)


def _check_rollouts(prompt_ids: torch.Tensor, responses: Sequence[torch.Tensor]) -> None:
    if len(prompt_ids) == 0:
        raise ValueError("empty prompt")
    if not responses:
        raise ValueError("no responses")
    if any(len(r) == 0 for r in responses):
        raise ValueError("empty response (a response needs at least one token)")


def behavior_log_probs(
    log_prob_fn: LogProbFn,
    prompt_ids: torch.Tensor,
    responses: Sequence[torch.Tensor],
    max_tokens: int,
    device: torch.device | str,
) -> list[torch.Tensor]:
    """log beta of every response token by teacher forcing (no grad): one float32 CPU tensor per response.

    Use the same ``log_prob_fn`` and ``max_tokens`` as for ``prompt_gradient`` later, so that at
    theta == beta every importance ratio is exactly 1.
    """
    _check_rollouts(prompt_ids, responses)
    out: list[torch.Tensor | None] = [None] * len(responses)
    with torch.no_grad():
        for batch in plan_micro_batches([len(r) for r in responses], len(prompt_ids), max_tokens):
            ids, attn, act = pack_micro_batch(prompt_ids, [responses[k] for k in batch], device)
            lp = log_prob_fn(ids, attn, act).float().cpu()
            for row, k in enumerate(batch):
                out[k] = lp[row, : len(responses[k])].clone()
    return out  # type: ignore[return-value]


def surrogate_objective(
    log_probs: torch.Tensor,
    behavior: torch.Tensor,
    action_mask: torch.Tensor,
    advantages: torch.Tensor,
    num_responses: int,
) -> torch.Tensor:
    """This micro-batch's share of J = (1/K) sum_k A_k mean_t rho_{k,t}; shares add up to J.

    log_probs, behavior, action_mask: [B, A]; advantages: [B]; num_responses: K of the prompt.
    """
    mask = action_mask.bool()
    # Zero the log-ratio on padding before exp: exp(garbage) * 0 could be inf * 0 = nan.
    log_ratio = (log_probs - behavior).masked_fill(~mask, 0.0)
    rho = torch.exp(log_ratio) * mask
    per_response = rho.sum(-1) / mask.sum(-1)
    return (advantages * per_response).sum() / num_responses


def prompt_gradient(
    log_prob_fn: LogProbFn,
    params: Sequence[torch.Tensor],
    prompt_ids: torch.Tensor,
    responses: Sequence[torch.Tensor],
    rewards: torch.Tensor | Sequence[float],
    behavior: Sequence[torch.Tensor],
    max_tokens: int,
    device: torch.device | str,
    shapes: Sequence[torch.Size] | None = None,
) -> list[torch.Tensor]:
    """g_s = grad J of one prompt, as float32 tensors aligned with ``params``.

    A zero-variance prompt returns zeros without running the model (its gradient is exactly 0).
    ``shapes``: the parameters' full shapes where ``params`` hold only a partition of them
    (DeepSpeed ZeRO-3 gathers them for the forward; autograd then returns full-size gradients).
    """
    _check_rollouts(prompt_ids, responses)
    rewards = torch.as_tensor(rewards)
    if not (len(responses) == len(behavior) == len(rewards)):
        raise ValueError(
            f"{len(responses)} responses, {len(behavior)} behavior log-prob rows and {len(rewards)} rewards: "
            "these must be equal"
        )
    for k, (r, b) in enumerate(zip(responses, behavior)):
        if len(r) != len(b):
            raise ValueError(f"response {k}: {len(r)} tokens but {len(b)} behavior log-probs")
    shapes = shapes if shapes is not None else [p.shape for p in params]
    grads = [torch.zeros(shape, dtype=torch.float32, device=p.device) for p, shape in zip(params, shapes)]
    if bool(zero_variance(rewards)):
        return grads
    advantages = group_advantages(rewards)
    for batch in plan_micro_batches([len(r) for r in responses], len(prompt_ids), max_tokens):
        ids, attn, act = pack_micro_batch(prompt_ids, [responses[k] for k in batch], device)
        beh = torch.zeros(act.shape, dtype=torch.float32)
        for row, k in enumerate(batch):
            beh[row, : len(behavior[k])] = behavior[k]
        objective = surrogate_objective(
            log_prob_fn(ids, attn, act), beh.to(device), act, advantages[batch].to(device), len(responses)
        )
        parts = torch.autograd.grad(objective, list(params), allow_unused=True)
        for acc, part in zip(grads, parts):
            if part is not None:
                acc.add_(part)
    return grads
