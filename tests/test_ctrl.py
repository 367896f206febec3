"""CTRL's update rule on a finite problem: it converges to the tilted optimum softmax(log pi_ref + R/beta)
for every transform, and only the calibrated transforms ignore per-prompt reward scales and offsets."""
import pytest
import torch

from minialign.calibrated_reward import transformed_reward
from minialign.ctrl import ppo_loss, rloo_advantages

PI_REF = torch.tensor([0.10, 0.20, 0.30, 0.15, 0.25])
RAW = torch.tensor([0.3, -1.0, 0.1, 0.9, 0.5])  # rewards of the 5 responses, no ties
COUNTS = (PI_REF * 20).round().long()  # K = 20 reference samples in exact proportion to pi_ref
SORTED_REF = RAW.repeat_interleave(COUNTS).sort().values[None]  # (1, K)


def solve(transform, t, beta, raw=RAW, sorted_ref=SORTED_REF, iters=600, group=64, seed=0):
    """The CTRL update (G samples, k1 KL penalty in the reward, RLOO, PPO clip) on a categorical policy."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.log(PI_REF).clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.03)
    R_all = transformed_reward(transform, t, raw[None], sorted_ref)[0]  # (5,)
    for i in range(iters):
        with torch.no_grad():
            logp_all = torch.log_softmax(theta, 0)
            y = torch.multinomial(logp_all.exp(), group, replacement=True, generator=g)  # (G,)
            logp_old = logp_all[y][:, None]  # (G, 1): one-token "sequences"
            kl = (logp_old - torch.log(PI_REF)[y][:, None]).sum(1)
            adv = rloo_advantages((R_all[y] - beta * kl)[None])[0]
        for group_ in opt.param_groups:
            group_["lr"] = 0.03 * (1 - i / iters) + 1e-3
        for _ in range(2):
            loss = ppo_loss(torch.log_softmax(theta, 0)[y][:, None], logp_old, torch.ones(group, 1), adv, 0.2)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return torch.softmax(theta.detach(), 0), torch.softmax(torch.log(PI_REF) + R_all / beta, 0)


def kl(p, q):
    return float((p * (p / q).log()).sum())


@pytest.mark.parametrize("transform,t,beta", [("raw", 0, 0.5), ("identity", 0, 0.2), ("log", 0, 1 / 3),
                                              ("exp", 5.0, 30.0), ("exp", -5.0, 0.2)])
def test_converges_to_tilted_optimum(transform, t, beta):
    learned, optimum = solve(transform, t, beta)
    assert kl(learned, optimum) < 0.02
    assert kl(PI_REF, optimum) > 0.05  # the optimum is far from where the policy started


def test_only_calibrated_transforms_ignore_reward_scale_and_offset():
    scaled, scaled_ref = 4 * RAW + 3, 4 * SORTED_REF + 3  # a strictly increasing transform of r
    for transform, t in (("identity", 0), ("log", 0), ("exp", 5.0), ("exp", -5.0)):
        assert torch.equal(transformed_reward(transform, t, RAW[None], SORTED_REF),
                           transformed_reward(transform, t, scaled[None], scaled_ref))
    a, _ = solve("raw", 0, 0.5)
    b, _ = solve("raw", 0, 0.5, raw=scaled, sorted_ref=scaled_ref)
    assert kl(a, b) > 0.1  # raw RLHF lands somewhere else
    c, _ = solve("identity", 0, 0.2)
    d, _ = solve("identity", 0, 0.2, raw=scaled, sorted_ref=scaled_ref)
    assert kl(c, d) < 1e-9  # same rewards, same seed: the very same run


def test_rloo_baseline_by_hand():
    adv = rloo_advantages(torch.tensor([[1.0, 2.0, 6.0]]))
    assert adv.tolist() == [[1 - 4, 2 - 3.5, 6 - 1.5]]


def test_micro_batched_update_equals_the_whole_batch_update(tiny_model):
    """Gradient accumulation over uneven micro-batches (3 + 3 + 2 rows) gives the whole batch's step."""
    import copy
    from minialign.ctrl import ppo_step
    from minialign.model import sequence_logprobs
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(257, (8, 12), generator=g)
    mask = (torch.rand(8, 11, generator=g) > 0.3).float()
    advantages = torch.randn(8, generator=g)
    whole_logp = sequence_logprobs(tiny_model, ids, 0)
    torch.testing.assert_close(sequence_logprobs(tiny_model, ids, 3), whole_logp, rtol=0, atol=1e-6)
    logp_old = whole_logp + 0.1 * torch.randn(8, 11, generator=g)  # ratios away from 1: some are clipped
    models = [copy.deepcopy(tiny_model).train() for _ in range(2)]
    for model, micro_batch in zip(models, (0, 3)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        ppo_step(model, model, optimizer, ids, logp_old, mask, advantages, 0.2, micro_batch)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    assert not torch.equal(models[0].transformer.wte.weight, tiny_model.transformer.wte.weight)  # it did step


def test_micro_batches_cut_to_their_longest_row_give_the_whole_batch_step(tiny_model):
    """Rows sorted by real length, each micro-batch cut to its longest row (its padding dropped): the
    same log-probs on every real position and the same optimizer step as the whole padded batch."""
    import copy
    from minialign.ctrl import ppo_step
    from minialign.model import sequence_logprobs
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([4, 5, 7, 8, 9, 12, 12, 12])  # sorted, as train_ctrl sorts them
    ids = torch.randint(257, (8, 12), generator=g)
    mask = torch.zeros(8, 11)
    for b, n in enumerate(lengths):
        ids[b, n:] = 0  # right padding
        mask[b, 2: n - 1] = 1.0  # the "response" positions
    advantages = torch.randn(8, generator=g)
    whole = sequence_logprobs(tiny_model, ids, 0)
    cut = sequence_logprobs(tiny_model, ids, 3, lengths)
    torch.testing.assert_close(cut * mask, whole * mask, rtol=0, atol=1e-6)
    assert (cut[0, 6:] == 0).all() and (cut[0, :6] != 0).all()  # first chunk (4, 5, 7): width 7
    logp_old = whole + 0.1 * torch.randn(8, 11, generator=g)
    models = [copy.deepcopy(tiny_model).train() for _ in range(2)]
    for model, micro_batch, lens in zip(models, (0, 3), (None, lengths)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        ppo_step(model, model, optimizer, ids, logp_old, mask, advantages, 0.2, micro_batch, lens)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_ctrl_scores_each_sample_as_calibration_scores_the_same_text(tiny_model, monkeypatch):
    """One rule for the scored text: the texts a CTRL step hands its reward are the texts ``complete``
    (calibration, the support, the evaluation) makes of the same tokens, a reply's leading space and
    closing newline included in the tokens and in neither text."""
    import copy
    from minialign import ctrl, sampling
    from minialign.distributed import setup
    from minialign.tokenizer import get_tokenizer
    from minialign.training import TrainingState
    tokenizer = get_tokenizer("bytes")
    replies = [" It is l.\n", " No, that would be wrong.", "  Fine, here is how:\n"]  # ended by a stop, or cut

    def scripted_generate(model, prompts, max_new_tokens, stop, keep_stop=False, logprobs=False, **sampling_args):
        rows = [tokenizer.encode(replies[i % 3]) for i in range(len(prompts))]
        rows = [r if keep_stop or r[-1] not in stop else r[:-1] for r in rows]
        return (rows, [torch.full((len(r),), -1.0) for r in rows]) if logprobs else rows
    monkeypatch.setattr(sampling, "generate", scripted_generate)
    monkeypatch.setattr(ctrl, "generate", scripted_generate)
    prompts = ["Human: Hi?\nAssistant:", "Human: Why?\nAssistant:"]
    scored = []

    def reward(ps, texts):
        scored.extend(texts)
        return torch.zeros(len(texts))
    policy = copy.deepcopy(tiny_model)
    run = TrainingState(torch.optim.SGD(policy.parameters(), lr=0.0),
                        {"generator": torch.Generator().manual_seed(0), "sample_generator": torch.Generator()})
    ctrl.ctrl_step(policy, policy, tiny_model, run, reward, tokenizer, prompts, [tokenizer.encode(p) for p in prompts],
                   torch.zeros(2, 4), ctrl.CTRLConfig(prompts_per_step=2, group=3, device="cpu"),
                   setup(torch.device("cpu")))
    assert scored == sampling.complete(tiny_model, tokenizer, prompts * 3, 24)
    assert scored[:3] == ["It is l.", "No, that would be wrong.", "Fine, here is how:"]


@pytest.mark.parametrize("transform,t,beta", [("raw", 0, 0.5), ("log", 0, 1 / 3), ("exp", 5.0, 30.0), ("exp", -5.0, 0.2)])
def test_the_warm_start_target_is_the_optimum_log_ratio(transform, t, beta):
    """Least squares on log pi - log pi_ref = ``optimum_log_ratio`` (the warm start's fit) lands on the
    tilted optimum: on a categorical policy over the 5 responses, with log Z from the calibration set."""
    from minialign.ctrl import optimum_log_ratio
    target = optimum_log_ratio(RAW[None], SORTED_REF, transform, t, beta)[0]  # (5,)
    theta = torch.log(PI_REF).clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(2000):
        loss = ((torch.log_softmax(theta, 0) - torch.log(PI_REF) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    R = transformed_reward(transform, t, RAW[None], SORTED_REF)[0]
    optimum = torch.softmax(torch.log(PI_REF) + R / beta, 0)
    assert loss.item() < 1e-8  # the target is exactly reachable: log Z is the right normaliser
    torch.testing.assert_close(torch.softmax(theta.detach(), 0), optimum, rtol=0, atol=1e-4)
    assert kl(PI_REF, optimum) > 0.05


def test_kl_to_go_advantages_by_hand(tiny_model, monkeypatch):
    """With ``--kl sampled --kl_to_go`` token t's advantage is the sequence's plus beta times the KL of the
    tokens before it: the first response token keeps the whole sequence's, later ones drop what they cannot
    change."""
    import minialign.ctrl as ctrl
    from minialign.model import sequence_logprobs
    seen = []
    monkeypatch.setattr(ctrl, "ppo_step", lambda *args, **kw: seen.append(args[6]))
    rows, responses = [[1, 2], [1, 2], [3], [3]], [[5, 6, 7], [8], [9, 10], [11, 12]]
    logp_old = [torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-3.0]), torch.tensor([-0.2, -0.4]), torch.tensor([-1.5, -0.1])]
    R = torch.tensor([[1.0, 0.0], [0.5, 2.0]])
    outcomes = {}
    for to_go in (False, True):
        cfg = ctrl.CTRLConfig(group=2, beta=0.5, kl="sampled", kl_to_go=to_go, ppo_epochs=1, micro_batch=0)
        outcomes[to_go] = ctrl.rl_update(None, None, tiny_model, None, rows, responses, logp_old, R, cfg, "cpu"), seen[-1]
    kl, sequence = outcomes[False]
    _, tokens = outcomes[True]
    logp_ref = sequence_logprobs(tiny_model, ctrl.pad_with_lengths(rows, responses)[0], 0)
    assert sequence.shape == (4,) and tokens.shape == (4, 4)
    for b, (p, y) in enumerate(zip(rows, responses)):
        first = len(p) - 1  # the position predicting the first response token
        token_kl = [float(logp_old[b][i] - logp_ref[b, first + i]) for i in range(len(y))]
        assert abs(sum(token_kl) - float(kl[b])) < 1e-5
        for i in range(len(y)):
            torch.testing.assert_close(tokens[b, first + i], sequence[b] + 0.5 * sum(token_kl[:i]), rtol=0, atol=1e-5)


class TwoTokenPolicy(torch.nn.Module):
    """A policy over two-token responses with free logits: pi(y1) and pi(y2 | y1) over V tokens, the
    prompt one token. Small enough to enumerate every response and every group of samples."""

    def __init__(self, V: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.first = torch.nn.Parameter(torch.randn(V, generator=g))
        self.second = torch.nn.Parameter(torch.randn(V, V, generator=g))

    def forward(self, idx):  # (B, 2): the prompt token, y1 -> next-token logits (B, 2, V)
        return torch.stack([self.first.expand(idx.size(0), -1), self.second[idx[:, 1]]], 1)


@pytest.mark.parametrize("estimator,kl_to_go", [("sampled", False), ("sampled", True), ("analytic", False)])
def test_each_kl_estimator_gives_the_gradient_of_the_regularised_objective(estimator, kl_to_go):
    """Every KL estimator, with the RLOO baseline and the per-token advantages it allows, is unbiased: the
    CTRL loss's gradient averaged over every group of G = 2 samples, each weighted by its probability,
    equals minus the exact gradient of E_pi[R] - beta * KL(pi || pi_ref), enumerated over all responses."""
    import itertools
    from minialign.ctrl import kl_penalty, token_advantages, token_kls
    from minialign.model import next_token_logprobs
    V, beta, group = 3, 0.7, 2
    policy, reference = TwoTokenPolicy(V, 0), TwoTokenPolicy(V, 1).requires_grad_(False)
    responses = list(itertools.product(range(V), repeat=2))  # all 9 responses
    R = torch.randn(len(responses), generator=torch.Generator().manual_seed(2))  # a reward per response
    ids_all = torch.tensor([[0, a, b] for a, b in responses])  # (9, 3): prompt token 0, then the response
    mask = torch.ones(group, 2)

    logp = next_token_logprobs(policy, ids_all).gather(-1, ids_all[:, 1:, None]).squeeze(-1).sum(1)  # (9,)
    logp_ref = next_token_logprobs(reference, ids_all).gather(-1, ids_all[:, 1:, None]).squeeze(-1).sum(1)
    objective = (logp.exp() * (R - beta * (logp - logp_ref))).sum()
    exact = torch.autograd.grad(objective, list(policy.parameters()))

    expected = [torch.zeros_like(p) for p in policy.parameters()]
    for members in itertools.product(range(len(responses)), repeat=group):  # every group, in order
        ids = ids_all[list(members)]  # (G, 3)
        logp_all = next_token_logprobs(policy, ids)  # (G, 2, V)
        logp_tokens = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (G, 2)
        kl_tokens = token_kls(policy, reference, ids, logp_tokens.detach(), mask, estimator, 0, None)
        advantages = token_advantages(R[list(members)][None], kl_tokens, beta, estimator, kl_to_go)
        loss = ppo_loss(logp_tokens, logp_tokens.detach(), mask, advantages, 0.2)
        if estimator == "analytic":
            loss = loss + beta * kl_penalty(logp_all, next_token_logprobs(reference, ids), mask)
        weight = float(logp.detach()[list(members)].sum().exp())  # the group's probability
        for total, g in zip(expected, torch.autograd.grad(loss, list(policy.parameters()))):
            total += weight * g
    for e, x in zip(expected, exact):
        torch.testing.assert_close(e, -x, rtol=1e-4, atol=1e-6)
