"""Off-policy policy gradient of one prompt (CROPI's g_s), batched within a token budget.

For a prompt s with K stored responses y_k, rewards r_k and behavior log-probs log beta:

    rho_{k,t} = exp(log pi_theta(y_{k,t} | .) - log beta(y_{k,t} | .))
    J(theta)  = sum_k w_k (1/|y_k|) sum_t rho_{k,t}                (= -L of the method doc)
    g_s       = grad_theta J                                       (no clipping, no KL term)

with w_k the response's weight in the objective the job trains (``advantages.Objective``:
length penalties, the advantage estimator, the loss aggregation; the method's GRPO is
w_k = A_k / K). Only response tokens count. Identical responses have identical ratios, so each
distinct response is one row, weighted by the summed weights of its copies (``first_copies``:
half the rows of the demo's rollouts). The rows are packed into micro-batches of at most
``max_tokens`` padded tokens; J is a sum over rows, so the micro-batch gradients add up to g_s
exactly. ``projected_gradient`` returns P g_s without ever holding g_s: each
parameter's gradient is projected the moment autograd produces it (a hook on the parameter)
and then dropped, and the projected micro-batch contributions are summed (P is linear). Its
memory beyond a training forward+backward of the same micro-batch is one parameter's gradient
(and a tied weight's partial sum), the projector's temporaries and O(d); a training step
additionally holds every ``.grad``. ``prompt_gradient`` returns g_s itself (model-sized: for
references on small models). Gradients come from ``torch.autograd.grad``: ``.grad``, the
optimizer state and hooks that act on gradient accumulation (DeepSpeed's) are never touched,
so this can run in the middle of training.

The model is reached only through a ``LogProbFn``:

    log_prob_fn(input_ids [B, T], attention_mask [B, T], action_mask [B, A]) -> [B, A]

returning the log-probs of the LAST A tokens of each row (values where action_mask is 0 are
ignored). This is the contract of OpenRLHF's ``Actor.forward(sequences, action_mask=...,
attention_mask=...)``; ``causal_lm_log_prob_fn`` is the same computation for a plain
transformers causal LM (the integration passes it the Actor's module), on one shared copy of the
prompt where that is cheaper. Rows are laid out as
``[prompt | response | right padding]`` (one prompt per call, so no left padding is needed).
``checkpointing_mode`` runs such a model with activation checkpointing as in training but
without dropout.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterator, Sequence

import torch

from .advantages import Objective, first_copies, row_weights, zero_variance
from .projection import SparseProjector

LogProbFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def shares_prompt(model: torch.nn.Module) -> bool:
    """Whether ``causal_lm_log_prob_fn`` can pack a micro-batch's rows onto one copy of the prompt:
    eager or SDPA attention (a custom 4D mask; flash-attention takes none) over full attention in
    every layer (a sliding window would be lost with the mask)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("eager", "sdpa"):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(t == "full_attention" for t in layer_types)
    return getattr(config, "sliding_window", None) is None


def causal_lm_log_prob_fn(model: torch.nn.Module, temperature: float = 1.0, share_prompt: bool = True) -> LogProbFn:
    """LogProbFn for a transformers causal LM: float32 logits / temperature, next-token log-probs.

    Mirrors OpenRLHF's Actor: position ids from the attention mask, logits cast to float32 and
    divided by the sampling temperature. The caller puts the model in eval mode (no dropout), or
    in ``checkpointing_mode``. No KV cache is built.

    ``share_prompt``: the rows of a micro-batch all start with the same prompt (``pack_micro_batch``),
    so where ``shares_prompt(model)`` they run as one row ``[prompt | y_1 | ... | y_B]`` (responses
    unpadded) whose mask lets each response see the prompt and its own earlier tokens, at the
    positions it has in its own row: the same log-probs from p + sum|y_k| tokens instead of
    B (p + max|y_k|) (the demo's prompts are 78% of its padded rows). One model call, so each
    parameter's gradient still arrives once, whole. It costs an L x L mask (model dtype) and
    attention scores over L = p + sum|y_k| tokens, so it is taken only where it costs fewer FLOPs
    than whole rows and, for L > 2048, holds no more scores than they do (long responses: whole rows).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    share_prompt = share_prompt and hidden is not None and shares_prompt(model)

    def next_token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if temperature != 1.0:  # in place (as OpenRLHF does): no second T x V float32 tensor
            logits = logits.div_(temperature)
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)

    def whole_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, num_actions: int) -> torch.Tensor:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
        # Only the logits that predict the last num_actions tokens are needed.
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=num_actions + 1,
            use_cache=False,
        )
        return next_token_log_probs(out.logits[:, :-1], input_ids[:, -num_actions:])

    def one_row(input_ids: torch.Tensor, attention_mask: torch.Tensor, num_actions: int, lengths: list[int]) -> torch.Tensor:
        rows, prompt_length = len(input_ids), input_ids.shape[1] - num_actions
        p, device = prompt_length, input_ids.device
        ids = torch.cat([input_ids[0, :p]] + [input_ids[k, p : p + n] for k, n in enumerate(lengths)])
        segment = torch.cat([torch.zeros(p, dtype=torch.long)] + [torch.full((n,), k + 1) for k, n in enumerate(lengths)])
        positions = torch.cat([torch.arange(p)] + [torch.arange(p, p + n) for n in lengths])
        visible = torch.ones(len(ids), len(ids), dtype=torch.bool).tril_()  # causal ...
        visible &= (segment[None, :] == 0) | (segment[None, :] == segment[:, None])  # ... within prompt + own response
        mask = torch.zeros(visible.shape, dtype=model.dtype).masked_fill_(~visible, torch.finfo(model.dtype).min)
        # The position whose logits predict token t of response k: the prompt's last for t = 0,
        # else its own token t - 1; any position for padding.
        start = p + torch.cumsum(torch.tensor([0] + lengths[:-1]), 0)[:, None]
        t = torch.arange(num_actions)[None, :]
        keep = torch.where(t == 0, p - 1, start + t - 1).where(t < torch.tensor(lengths)[:, None], p - 1)
        out = model(input_ids=ids[None], attention_mask=mask[None, None].to(device), position_ids=positions[None].to(device),
                    logits_to_keep=keep.reshape(-1).to(device), use_cache=False)  # fmt: skip
        return next_token_log_probs(out.logits[0].view(rows, num_actions, -1), input_ids[:, -num_actions:])

    def log_probs(input_ids: torch.Tensor, attention_mask: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
        num_actions = action_mask.shape[1]
        if share_prompt:
            rows, padded = input_ids.shape
            prompt_length = padded - num_actions
            lengths = attention_mask[:, prompt_length:].sum(-1)
            steps = torch.arange(num_actions, device=lengths.device)
            if not bool((input_ids[:, :prompt_length] == input_ids[:1, :prompt_length]).all()
                        and attention_mask[:, :prompt_length].all()
                        and (attention_mask[:, prompt_length:] == (steps < lengths[:, None])).all()):  # fmt: skip
                raise ValueError("rows must be [prompt | response | right padding] with one prompt (pack_micro_batch)")
            lengths = lengths.tolist()
            packed = prompt_length + sum(lengths)
            # Per layer: about 6 d FLOP units per token for the linear maps against 1 per attention
            # score; and beyond 2048 tokens no more scores (eager attention holds them) than whole rows.
            cheaper = 6 * hidden * packed + packed**2 < rows * (6 * hidden * padded + padded**2)
            if cheaper and (packed <= 2048 or packed**2 <= rows * padded**2):
                return one_row(input_ids, attention_mask, num_actions, lengths)
        return whole_rows(input_ids, attention_mask, num_actions)

    return log_probs


@contextlib.contextmanager
def checkpointing_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode, except that the layers which checkpoint activations are in training mode.

    transformers checkpoints a layer (``gradient_checkpointing_enable``) only while that layer
    is in training mode. Setting ``training`` on those layers alone, not on their submodules,
    keeps every dropout module off, so values and gradients are those of eval mode while
    activation memory is that of training. A model whose config asks for dropout is refused:
    a checkpointing layer could apply it functionally in its own forward. Modes are restored
    on exit.
    """
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    config = getattr(model, "config", None)
    dropout = {k: v for k, v in (config.to_dict() if layers and config is not None else {}).items()
               if "dropout" in k and type(v) in (int, float) and v > 0}  # fmt: skip
    if dropout:
        raise ValueError(
            f"{type(model).__name__}: config {dropout} turns on dropout in training mode, which gradient "
            "checkpointing needs; set it to 0 or turn off gradient checkpointing"
        )
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    for layer in layers:
        layer.training = True
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks: the ModuleList holding the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of transformer blocks")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def top_layers_parameters(model: torch.nn.Module, num_layers: int) -> list[torch.nn.Parameter]:
    """The trainable parameters of the top ``num_layers`` transformer blocks and of everything
    outside the blocks except the input embedding (the final norm, an untied lm_head), in model
    order; 0: every trainable parameter. ``torch.autograd.grad`` with respect to these runs no
    backward through the blocks below, which is what makes the gradient cheaper. A head tied to
    the input embedding is left out with it: its gradient would need the whole backward."""
    params = [p for p in model.parameters() if p.requires_grad]
    if num_layers == 0:
        return params
    blocks = transformer_blocks(model)
    if not 0 < num_layers <= len(blocks):
        raise ValueError(f"num_layers must be in [0, {len(blocks)}] (the model's blocks), got {num_layers}")
    below = {id(p) for block in blocks[: len(blocks) - num_layers] for p in block.parameters()}
    below |= {id(p) for p in model.get_input_embeddings().parameters()}
    return [p for p in params if id(p) not in below]


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

    Use the same ``log_prob_fn`` and ``max_tokens`` as for ``projected_gradient`` later, so that at
    theta == beta every importance ratio is exactly 1. Identical responses are computed once.
    """
    _check_rollouts(prompt_ids, responses)
    first = first_copies(responses)
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for ks in _distinct_micro_batches(responses, first, len(prompt_ids), max_tokens):
            ids, attn, act = pack_micro_batch(prompt_ids, [responses[k] for k in ks], device)
            lp = log_prob_fn(ids, attn, act).float().cpu()
            for row, k in enumerate(ks):
                out[k] = lp[row, : len(responses[k])].clone()
    return [out[f] if f == k else out[f].clone() for k, f in enumerate(first)]


def _distinct_micro_batches(
    responses: Sequence[torch.Tensor], first: Sequence[int], prompt_length: int, max_tokens: int
) -> list[list[int]]:
    """``plan_micro_batches`` over the distinct responses (first copies), as response indices."""
    distinct = [k for k, f in enumerate(first) if f == k]
    plan = plan_micro_batches([len(responses[k]) for k in distinct], prompt_length, max_tokens)
    return [[distinct[j] for j in batch] for batch in plan]


def forward_passes(prompt_length: int, response_lengths: Sequence[int], distinct: Sequence[bool], max_tokens: int) -> int:
    """Micro-batches that teacher forcing or a gradient of one prompt runs: its distinct responses
    (``distinct[k]``: response k is a first copy) planned as ``plan_micro_batches`` plans them."""
    return len(plan_micro_batches([n for n, d in zip(response_lengths, distinct) if d], prompt_length, max_tokens))


def surrogate_objective(
    log_probs: torch.Tensor, behavior: torch.Tensor, action_mask: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """This micro-batch's share of J = sum_k w_k mean_t rho_{k,t}; shares add up to J.

    log_probs, behavior, action_mask: [B, A]; weights: [B] (a row's: those of all its copies).
    """
    mask = action_mask.bool()
    # Zero the log-ratio on padding before exp: exp(garbage) * 0 could be inf * 0 = nan.
    log_ratio = (log_probs - behavior).masked_fill(~mask, 0.0)
    rho = torch.exp(log_ratio) * mask
    per_response = rho.sum(-1) / mask.sum(-1)
    return (weights * per_response).sum()


def micro_batch_objectives(
    log_prob_fn: LogProbFn,
    prompt_ids: torch.Tensor,
    responses: Sequence[torch.Tensor],
    rewards: torch.Tensor | Sequence[float],
    behavior: Sequence[torch.Tensor],
    max_tokens: int,
    device: torch.device | str,
    *,
    truncated: Sequence[bool] | None = None,
    objective: Objective = Objective(),
) -> Iterator[torch.Tensor]:
    """Each micro-batch's share of J, with its graph; nothing where every weight is 0 (g_s = 0).

    ``truncated``: which responses the engine cut at the length limit (for
    ``objective.stop_properly_penalty_coef``)."""
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
    lengths = [len(r) for r in responses]
    if bool(zero_variance(objective.rewards(rewards, lengths, truncated))):
        return iter(())
    first = first_copies(responses)
    # A distinct response's row carries the weights of all its copies (the first copy's log beta).
    weights = row_weights(first, objective.weights(rewards, lengths, truncated))

    def objectives() -> Iterator[torch.Tensor]:
        for ks in _distinct_micro_batches(responses, first, len(prompt_ids), max_tokens):
            ids, attn, act = pack_micro_batch(prompt_ids, [responses[k] for k in ks], device)
            beh = torch.zeros(act.shape, dtype=torch.float32)
            for row, k in enumerate(ks):
                beh[row, : len(behavior[k])] = behavior[k]
            yield surrogate_objective(log_prob_fn(ids, attn, act), beh.to(device), act, weights[ks].to(device))

    return objectives()  # a generator inside, so that bad input raises at the call


def stream_gradients(
    objective: torch.Tensor, params: Sequence[torch.Tensor], on_gradient: Callable[[int, torch.Tensor], None]
) -> None:
    """Backward of ``objective``: ``on_gradient(i, grad)`` gets the gradient of ``params[i]`` the
    moment autograd has it (all contributions summed, e.g. both uses of a tied weight), and the
    gradient is dropped when that returns. No gradient is kept, and ``.grad`` is not touched."""

    def hook(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def consume(grad: torch.Tensor) -> torch.Tensor:
            on_gradient(i, grad)
            # What a leaf's hook returns is what autograd.grad returns for it: a zero-stride
            # zero costs no memory, so the gradient itself is freed now.
            return grad.new_zeros(()).expand(grad.shape)

        return consume

    handles = [p.register_hook(hook(i)) for i, p in enumerate(params)]
    try:
        torch.autograd.grad(objective, list(params), allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()


def prompt_gradient(
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
) -> list[torch.Tensor]:
    """g_s = grad J of one prompt, as float32 tensors aligned with ``params``.

    Model-sized (a float32 copy of every parameter): for exact references on small models.
    A zero-variance prompt returns zeros without running the model (its gradient is exactly 0).
    """
    grads = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    for share in micro_batch_objectives(log_prob_fn, prompt_ids, responses, rewards, behavior, max_tokens, device,
                                        truncated=truncated, objective=objective):  # fmt: skip
        stream_gradients(share, params, lambda i, grad: grads[i].add_(grad))
    return grads


def projected_gradient(
    log_prob_fn: LogProbFn,
    params: Sequence[torch.Tensor],
    projector: SparseProjector,
    prompt_ids: torch.Tensor,
    responses: Sequence[torch.Tensor],
    rewards: torch.Tensor | Sequence[float],
    behavior: Sequence[torch.Tensor],
    max_tokens: int,
    device: torch.device | str,
    numels: Sequence[int] | None = None,
    *,
    truncated: Sequence[bool] | None = None,
    objective: Objective = Objective(),
) -> torch.Tensor:
    """P g_s of one prompt: [d] float32 on ``device``, with no model-sized buffer (module doc).

    The parameters are laid end to end in the order of ``params``: parameter i covers global
    coordinates [sum(numels[:i]), sum(numels[:i+1])). ``numels``: the parameters' full sizes
    where ``params`` hold only a partition of them (DeepSpeed ZeRO-3 gathers them for the
    forward, and autograd then yields full-size gradients). A zero-variance prompt returns
    zeros without running the model. A non-finite kept coordinate makes the vector non-finite
    (coordinates that are not kept do not enter any score): check the vector.
    """
    numels = [p.numel() for p in params] if numels is None else list(numels)
    if len(numels) != len(params) or sum(numels) != projector.total_params:
        raise ValueError(
            f"{len(params)} parameters of {sum(numels):,} coordinates in all (numels: {len(numels)}), "
            f"the projector expects {projector.total_params:,}"
        )
    offsets = [0, *itertools.accumulate(numels)]
    acc = projector.accumulator(device=device)

    def project(i: int, grad: torch.Tensor) -> None:
        if grad.numel() != numels[i]:
            raise RuntimeError(f"parameter {i}: gradient of {grad.numel():,} coordinates, expected {numels[i]:,}")
        projector.accumulate(acc, grad.reshape(-1), offsets[i])

    for share in micro_batch_objectives(log_prob_fn, prompt_ids, responses, rewards, behavior, max_tokens, device,
                                        truncated=truncated, objective=objective):  # fmt: skip
        stream_gradients(share, params, project)
    return projector.finish(acc)
