"""Off-policy per-prompt gradients against an explicit, one-response-at-a-time autograd oracle;
the streamed projection against the projected oracle; its memory, by the allocator's accounting."""

import itertools
import statistics

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from openrlhf_cropi.core.advantages import GROUP_NORM_EPS, group_advantages, zero_variance
from openrlhf_cropi.core.gradients import (
    behavior_log_probs,
    causal_lm_log_prob_fn,
    checkpointing_mode,
    forward_passes,
    micro_batch_objectives,
    pack_micro_batch,
    plan_micro_batches,
    projected_gradient,
    prompt_gradient,
    shares_prompt,
    stream_gradients,
    top_layers_parameters,
)
from openrlhf_cropi.core.projection import SparseProjector

PROMPT = torch.tensor([5, 17, 3, 99, 42])
RESPONSES = [torch.tensor(r) for r in ([7, 8, 9], [1, 2, 3, 4, 5, 6, 7], [11], [20, 30, 40, 50, 60])]
REWARDS = [1.0, 0.0, 0.0, 1.0]


def oracle_token_log_probs(model, prompt, response, temperature=1.0):
    """log pi(y_t | prompt, y_<t) for each t, from one unpadded row, read off position by position."""
    ids = torch.cat([prompt, response]).unsqueeze(0)
    logits = model(input_ids=ids).logits[0].float() / temperature
    out = []
    for t in range(len(response)):
        row = logits[len(prompt) - 1 + t]  # the logits at position i predict token i + 1
        out.append(torch.log_softmax(row, dim=-1)[response[t]])
    return out


def oracle_advantages(rewards):
    mean, std = statistics.mean(rewards), statistics.stdev(rewards)  # stdev: n - 1 denominator
    return [(r - mean) / (std + GROUP_NORM_EPS) for r in rewards]


def oracle_gradient(model, prompt, responses, rewards, behavior, temperature=1.0):
    """grad of (1/K) sum_k A_k (1/|y_k|) sum_t exp(logp - logb), one response at a time."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    adv = oracle_advantages(rewards)
    for k, response in enumerate(responses):
        lps = oracle_token_log_probs(model, prompt, response, temperature)
        j_k = 0.0
        for t, lp in enumerate(lps):
            j_k = j_k + torch.exp(lp - behavior[k][t])
        j_k = adv[k] * j_k / len(response) / len(responses)
        for acc, g in zip(total, torch.autograd.grad(j_k, params, allow_unused=True)):
            if g is not None:
                acc += g
    return total


def perturb(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def assert_grads_close(got, want):
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_advantages_match_openrlhf_group_norm():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.3, 0.3, 0.3]])
    adv = group_advantages(r)
    want = oracle_advantages(r[0].tolist())
    torch.testing.assert_close(adv[0], torch.tensor(want), rtol=1e-6, atol=1e-7)
    assert torch.equal(adv[1], torch.zeros(5))  # all equal: exactly zero
    assert zero_variance(r).tolist() == [False, True]
    assert zero_variance([1.0]).item()  # a single response has no group
    with pytest.raises(ValueError):
        group_advantages([1.0])


def test_plan_micro_batches_respects_budget():
    lengths = [3, 7, 1, 5, 7, 2]
    batches = plan_micro_batches(lengths, prompt_length=4, max_tokens=24)
    assert sorted(k for b in batches for k in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * (4 + max(lengths[k] for k in b)) <= 24
    assert batches == plan_micro_batches(lengths, 4, 24)  # deterministic
    assert batches[0] == [1, 4]  # longest first, index tie-break
    assert plan_micro_batches(lengths, 4, 1) == [[1], [4], [3], [0], [5], [2]]  # over budget: alone


def test_log_prob_fn_matches_oracle_with_padding(tiny_lm):
    fn = causal_lm_log_prob_fn(tiny_lm, temperature=0.7)
    ids, attn, act = pack_micro_batch(PROMPT, RESPONSES, "cpu")
    with torch.no_grad():
        got = fn(ids, attn, act)
        for k, r in enumerate(RESPONSES):
            want = torch.stack(oracle_token_log_probs(tiny_lm, PROMPT, r, temperature=0.7))
            torch.testing.assert_close(got[k, : len(r)], want, rtol=1e-5, atol=1e-5)


def row_shapes(model):
    """The input_ids shapes of the model's forward calls, recorded."""
    shapes = []
    model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)  # fmt: skip
    return shapes


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_shared_prompt_row_matches_the_oracle(tiny_lm, attention):
    """The rows of a micro-batch run as one row [prompt | y_1 | ... | y_B]: one call, p + sum|y_k|
    tokens, the oracle's log-probs and gradient (each response alone, unpadded)."""
    model = tiny_lm
    model.set_attn_implementation(attention)
    shapes = row_shapes(model)
    fn = causal_lm_log_prob_fn(model, temperature=0.7)
    ids, attn, act = pack_micro_batch(PROMPT, RESPONSES, "cpu")
    with torch.no_grad():
        got = fn(ids, attn, act)
    assert shapes == [(1, len(PROMPT) + sum(len(r) for r in RESPONSES))]
    for k, r in enumerate(RESPONSES):
        want = torch.stack(oracle_token_log_probs(model, PROMPT, r, temperature=0.7))
        torch.testing.assert_close(got[k, : len(r)], want, rtol=1e-5, atol=1e-5)
    behavior = [b - 0.1 * k for k, b in enumerate(behavior_log_probs(fn, PROMPT, RESPONSES, 10_000, "cpu"))]
    got = prompt_gradient(fn, list(model.parameters()), PROMPT, RESPONSES, REWARDS, behavior, 10_000, "cpu")
    assert_grads_close(got, oracle_gradient(model, PROMPT, RESPONSES, REWARDS, behavior, temperature=0.7))


def test_whole_rows_where_a_shared_prompt_cannot_apply_or_costs_more(tiny_lm):
    ids, attn, act = pack_micro_batch(PROMPT, RESPONSES, "cpu")
    shapes = row_shapes(tiny_lm)
    causal_lm_log_prob_fn(tiny_lm, share_prompt=False)(ids, attn, act)
    assert shapes == [tuple(ids.shape)]
    # Long responses after a short prompt: attention over one long row would cost more.
    long_ids, long_attn, long_act = pack_micro_batch(PROMPT[:1], [torch.arange(100) % 50 + 1] * 4, "cpu")
    causal_lm_log_prob_fn(tiny_lm)(long_ids, long_attn, long_act)
    assert shapes[-1] == tuple(long_ids.shape)
    with pytest.raises(ValueError, match="one prompt"):  # rows that do not share their prompt
        causal_lm_log_prob_fn(tiny_lm)(torch.cat([ids[:1], ids[1:].flip(1)]), attn, act)
    # Flash-attention takes no custom mask; a sliding window would be lost with it.
    assert shares_prompt(tiny_lm)
    tiny_lm.config.layer_types = ["sliding_attention", "full_attention"]
    assert not shares_prompt(tiny_lm)
    tiny_lm.config.layer_types = ["full_attention"] * 2
    tiny_lm.config._attn_implementation = "flash_attention_2"
    assert not shares_prompt(tiny_lm)


@pytest.mark.parametrize("max_tokens", [10_000, 14])  # one micro-batch; several (budget 14 < 2 rows)
def test_gradient_on_policy_and_off_policy(tiny_lm, max_tokens):
    fn = causal_lm_log_prob_fn(tiny_lm)
    behavior = behavior_log_probs(fn, PROMPT, RESPONSES, max_tokens, "cpu")
    if max_tokens == 14:
        assert len(plan_micro_batches([len(r) for r in RESPONSES], len(PROMPT), 14)) >= 3
    params = list(tiny_lm.parameters())

    # theta == beta: rho == 1, the plain GRPO gradient.
    got = prompt_gradient(fn, params, PROMPT, RESPONSES, REWARDS, behavior, max_tokens, "cpu")
    assert_grads_close(got, oracle_gradient(tiny_lm, PROMPT, RESPONSES, REWARDS, behavior))

    # theta != beta: ratios differ from 1 (checked), the oracle still agrees.
    perturb(tiny_lm)
    with torch.no_grad():
        now = torch.stack(oracle_token_log_probs(tiny_lm, PROMPT, RESPONSES[1]))
    assert (now - behavior[1]).abs().max() > 1e-2
    got = prompt_gradient(fn, params, PROMPT, RESPONSES, REWARDS, behavior, max_tokens, "cpu")
    want = oracle_gradient(tiny_lm, PROMPT, RESPONSES, REWARDS, behavior)
    assert_grads_close(got, want)
    assert sum(float(g.norm()) for g in want) > 1e-3  # not trivially zero
    assert all(p.grad is None for p in params)  # training state untouched


def test_tied_embeddings_against_plain_autograd(tiny_tied_lm):
    """A tied lm_head / embedding is one parameter used twice: its streamed gradient (and its
    projection) is the sum of both uses, as plain torch.autograd.grad over the explicit loop gives."""
    model = tiny_tied_lm
    assert model.lm_head.weight is model.model.embed_tokens.weight
    fn = causal_lm_log_prob_fn(model)
    behavior = behavior_log_probs(fn, PROMPT, RESPONSES, 14, "cpu")
    perturb(model)
    params = list(model.parameters())  # the shared tensor once
    want = oracle_gradient(model, PROMPT, RESPONSES, REWARDS, behavior)
    assert_grads_close(prompt_gradient(fn, params, PROMPT, RESPONSES, REWARDS, behavior, 14, "cpu"), want)
    projector = SparseProjector(sum(p.numel() for p in params), 1.0, sum(p.numel() for p in params), "identity")
    got = projected_gradient(fn, params, projector, PROMPT, RESPONSES, REWARDS, behavior, 14, "cpu")
    torch.testing.assert_close(got, projector.project(want), rtol=1e-4, atol=1e-6)


def test_micro_batching_does_not_change_the_gradient(tiny_lm):
    fn = causal_lm_log_prob_fn(tiny_lm)
    behavior = behavior_log_probs(fn, PROMPT, RESPONSES, 10_000, "cpu")
    perturb(tiny_lm)
    params = list(tiny_lm.parameters())
    one = prompt_gradient(fn, params, PROMPT, RESPONSES, REWARDS, behavior, 10_000, "cpu")
    many = prompt_gradient(fn, params, PROMPT, RESPONSES, REWARDS, behavior, 1, "cpu")
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_copies_of_a_response_run_as_one_row(tiny_lm):
    """Identical responses (whose rewards agree or not) are one row carrying their summed
    advantages: the gradient is still the oracle's, which runs every copy on its own."""
    a, b, c = RESPONSES[0], RESPONSES[1], RESPONSES[3]
    responses, rewards = [a, b, a.clone(), c, a.clone(), b.clone()], [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    rows = []

    def counting(ids, attn, act):
        rows.append(len(ids))
        return causal_lm_log_prob_fn(tiny_lm)(ids, attn, act)

    behavior = behavior_log_probs(counting, PROMPT, responses, 10_000, "cpu")
    assert rows == [3]
    assert torch.equal(behavior[0], behavior[2]) and torch.equal(behavior[0], behavior[4])
    assert behavior[2] is not behavior[0]  # each response owns its tensor
    perturb(tiny_lm)
    params = list(tiny_lm.parameters())
    rows.clear()
    got = prompt_gradient(counting, params, PROMPT, responses, rewards, behavior, 10_000, "cpu")
    assert rows == [3]
    want = oracle_gradient(tiny_lm, PROMPT, responses, rewards, behavior)
    assert_grads_close(got, want)
    assert sum(float(g.norm()) for g in want) > 1e-3
    # With a budget of one row per pass, the passes run are the passes counted in advance.
    rows.clear()
    projector = SparseProjector(sum(p.numel() for p in params), 0.5, 64)
    projected_gradient(counting, params, projector, PROMPT, responses, rewards, behavior, 1, "cpu")
    assert rows == [1, 1, 1] == [1] * forward_passes(len(PROMPT), [3, 7, 3, 5, 3, 7], [1, 1, 0, 1, 0, 0], 1)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_behavior_log_probs_are_bitwise_what_the_gradient_pass_sees(tiny_lm, checkpointing):
    # As in the actor: checkpointing is enabled when the model is loaded, teacher forcing runs in
    # eval mode (so checkpoints nothing) and the gradient pass in checkpointing_mode.
    if checkpointing:
        tiny_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fn = causal_lm_log_prob_fn(tiny_lm)
    behavior = behavior_log_probs(fn, PROMPT, RESPONSES, 14, "cpu")
    for batch in plan_micro_batches([len(r) for r in RESPONSES], len(PROMPT), 14):
        ids, attn, act = pack_micro_batch(PROMPT, [RESPONSES[k] for k in batch], "cpu")
        with torch.enable_grad(), checkpointing_mode(tiny_lm):
            lp = fn(ids, attn, act)
        assert lp.requires_grad
        for row, k in enumerate(batch):
            assert torch.equal(lp[row, : len(RESPONSES[k])].detach(), behavior[k])  # rho == 1 exactly


def test_zero_variance_prompt_runs_no_forward(tiny_lm):
    calls = []

    def counting(*args):
        calls.append(1)
        return causal_lm_log_prob_fn(tiny_lm)(*args)

    behavior = [torch.zeros(len(r)) for r in RESPONSES]
    params = list(tiny_lm.parameters())
    grads = prompt_gradient(counting, params, PROMPT, RESPONSES, [1.0] * 4, behavior, 100, "cpu")
    projector = SparseProjector(sum(p.numel() for p in params), 0.5, 64)
    vector = projected_gradient(counting, params, projector, PROMPT, RESPONSES, [1.0] * 4, behavior, 100, "cpu")
    assert not calls
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert torch.equal(vector, torch.zeros(64))


def test_gradient_input_errors(tiny_lm):
    fn, params = causal_lm_log_prob_fn(tiny_lm), list(tiny_lm.parameters())
    behavior = [torch.zeros(len(r)) for r in RESPONSES]
    with pytest.raises(ValueError, match="rewards"):
        prompt_gradient(fn, params, PROMPT, RESPONSES, REWARDS[:3], behavior, 100, "cpu")
    with pytest.raises(ValueError, match="response 2"):
        prompt_gradient(fn, params, PROMPT, RESPONSES, REWARDS, behavior[:2] + [torch.zeros(4)] + behavior[3:], 100, "cpu")
    with pytest.raises(ValueError, match="empty response"):
        prompt_gradient(fn, params, PROMPT, RESPONSES[:3] + [torch.tensor([], dtype=torch.long)], REWARDS, behavior, 100, "cpu")
    projector = SparseProjector(sum(p.numel() for p in params), 0.5, 64)
    with pytest.raises(ValueError, match="rewards"):
        projected_gradient(fn, params, projector, PROMPT, RESPONSES, REWARDS[:3], behavior, 100, "cpu")
    with pytest.raises(ValueError, match="the projector expects"):
        projected_gradient(fn, params[1:], projector, PROMPT, RESPONSES, REWARDS, behavior, 100, "cpu")
    # Full sizes that disagree with what autograd yields (a mis-described ZeRO-3 partition).
    numels = [p.numel() for p in params]
    numels[0], numels[1] = numels[0] - 1, numels[1] + 1
    with pytest.raises(RuntimeError, match="parameter [01]: gradient of"):
        projected_gradient(fn, params, projector, PROMPT, RESPONSES, REWARDS, behavior, 100, "cpu", numels)


# ---- the streamed projection ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["identity", "sjlt", "gaussian"])
@pytest.mark.parametrize("max_tokens", [10_000, 14])
def test_projected_gradient_is_the_projected_oracle(tiny_lm, kind, max_tokens):
    temperature = 1.0 if max_tokens > 14 else 0.7  # logits divided in place under autograd
    fn = causal_lm_log_prob_fn(tiny_lm, temperature)
    behavior = behavior_log_probs(fn, PROMPT, RESPONSES, max_tokens, "cpu")
    perturb(tiny_lm)  # theta != beta
    params = list(tiny_lm.parameters())
    total = sum(p.numel() for p in params)
    keep, d = (1.0, total) if kind == "identity" else (0.3, 256)
    projector = SparseProjector(total, keep, d, kind, seed=4, sjlt_nnz=2 if kind == "sjlt" else 1)
    got = projected_gradient(fn, params, projector, PROMPT, RESPONSES, REWARDS, behavior, max_tokens, "cpu")
    want = projector.project(oracle_gradient(tiny_lm, PROMPT, RESPONSES, REWARDS, behavior, temperature))
    assert got.dtype == torch.float32 and got.shape == (d,)
    # identity: the whole gradient, coordinate by coordinate (so every parameter's offset).
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert want.norm() > 1e-3
    assert all(p.grad is None for p in params)  # training state untouched


def peak_allocated(fn) -> int:
    """Peak bytes held by torch's CPU allocator while ``fn`` runs, above what was held before:
    the running sum of the profiler's record of every allocation and free, in time order."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    assert events, "the profiler recorded no allocation"
    return max(itertools.accumulate(n for _, n in events))


def test_streamed_pass_allocates_no_model_sized_buffer():
    """On a model whose parameters dominate its activations, the pass's peak allocation stays
    far below one float32 copy of the parameters; a training step's and prompt_gradient's do not."""
    config = Qwen2Config(vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=64,
                         tie_word_embeddings=False)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).float().eval()
    params = list(model.parameters())
    param_bytes = 4 * sum(p.numel() for p in params)  # 8.5M parameters: 34 MB
    largest = 4 * max(p.numel() for p in params)  # 1 MB
    prompt, responses, rewards = torch.tensor([1, 2, 3]), [torch.tensor([4, 5, 6, 7]), torch.tensor([8, 9, 10])], [1.0, 0.0]
    fn = causal_lm_log_prob_fn(model)
    behavior = [b - 0.1 for b in behavior_log_probs(fn, prompt, responses, 100, "cpu")]
    projector = SparseProjector(sum(p.numel() for p in params), 0.1, 1024)

    def streamed():
        projected_gradient(fn, params, projector, prompt, responses, rewards, behavior, 100, "cpu")

    def training():  # an ordinary forward + loss.backward() of the same micro-batch
        ids, attn, act = pack_micro_batch(prompt, responses, "cpu")
        (-(fn(ids, attn, act) * act).sum()).backward()

    def floor():  # the same backward, every gradient dropped unused
        for objective in micro_batch_objectives(fn, prompt, responses, rewards, behavior, 100, "cpu"):
            stream_gradients(objective, params, lambda i, grad: None)

    streamed()  # builds the projector's layout: state, held before the measured pass
    peaks = {"streamed": peak_allocated(streamed), "floor": peak_allocated(floor), "training": peak_allocated(training)}
    model.zero_grad(set_to_none=True)
    peaks["prompt_gradient"] = peak_allocated(
        lambda: prompt_gradient(fn, params, prompt, responses, rewards, behavior, 100, "cpu")
    )
    print({k: f"{v / 2**20:.1f} MiB" for k, v in peaks.items()}, f"parameters {param_bytes / 2**20:.1f} MiB")
    assert peaks["training"] > param_bytes  # every .grad
    assert peaks["prompt_gradient"] > param_bytes  # the measurement does see a model-sized buffer
    # Activations and one parameter's gradient, never all of them; the projection adds its
    # temporaries (a tenth of one parameter at keep 0.1) and O(d).
    assert peaks["streamed"] < param_bytes / 4
    assert peaks["streamed"] <= peaks["floor"] + largest / 4


def test_checkpointing_mode_checkpoints_without_changing_results(tiny_lm):
    fn = causal_lm_log_prob_fn(tiny_lm)
    behavior = behavior_log_probs(fn, PROMPT, RESPONSES, 14, "cpu")
    perturb(tiny_lm)
    params = list(tiny_lm.parameters())
    projector = SparseProjector(sum(p.numel() for p in params), 0.5, 128)
    passes = len(plan_micro_batches([len(r) for r in RESPONSES], len(PROMPT), 14))
    mlp_calls = []
    # A pre-hook: the recomputation stops (early) as soon as the last saved tensor is rebuilt.
    tiny_lm.model.layers[0].mlp.register_forward_pre_hook(lambda *args: mlp_calls.append(1))

    def vector():
        mlp_calls.clear()
        return projected_gradient(fn, params, projector, PROMPT, RESPONSES, REWARDS, behavior, 14, "cpu")

    plain = vector()
    assert len(mlp_calls) == passes
    tiny_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert torch.equal(vector(), plain) and len(mlp_calls) == passes  # eval mode: transformers does not checkpoint
    tiny_lm.train()
    with checkpointing_mode(tiny_lm):
        layer = tiny_lm.model.layers[0]
        assert layer.training and not layer.mlp.training and not tiny_lm.training
        checkpointed = vector()
    assert len(mlp_calls) == 2 * passes  # each micro-batch's layer forward, then its recomputation in backward
    assert torch.equal(checkpointed, plain)
    assert all(m.training for m in tiny_lm.modules())  # modes restored


def test_checkpointing_mode_refuses_dropout():
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, attention_dropout=0.1)  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    with checkpointing_mode(model):  # not checkpointing: eval mode, no dropout anyway
        assert not model.training
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="attention_dropout"):
        with checkpointing_mode(model):
            pass
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("tied", [False, True])
def test_top_layers_gradient_is_the_full_gradients_restriction_without_the_lower_backward(tiny_lm, tiny_tied_lm, tied):
    model = tiny_tied_lm if tied else tiny_lm
    fn = causal_lm_log_prob_fn(model)
    behavior = behavior_log_probs(fn, PROMPT, RESPONSES, 10_000, "cpu")
    perturb(model)
    everything = list(model.parameters())
    full = dict(zip(map(id, everything), prompt_gradient(fn, everything, PROMPT, RESPONSES, REWARDS, behavior, 10_000, "cpu")))
    top = top_layers_parameters(model, 1)
    names = {n for n, p in model.named_parameters() if any(p is q for q in top)}
    want = {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")} | {"model.norm.weight"}
    assert names == (want if tied else want | {"lm_head.weight"})  # a tied head goes with the embedding
    assert top_layers_parameters(model, 0) == everything
    with pytest.raises(ValueError, match=r"num_layers must be in \[0, 2\]"):
        top_layers_parameters(model, 3)
    # The lower block's backward never runs.
    ran = []
    handle = model.model.layers[0].register_full_backward_hook(lambda *args: ran.append(1))
    try:
        got = prompt_gradient(fn, top, PROMPT, RESPONSES, REWARDS, behavior, 10_000, "cpu")
    finally:
        handle.remove()
    assert not ran
    for p, g in zip(top, got):
        torch.testing.assert_close(g, full[id(p)], rtol=1e-5, atol=1e-7)
