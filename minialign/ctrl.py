"""Stage 4, CTRL (InfAlign): KL-regularised RL on a transformed, calibrated reward.

InfAlign shows that the policy maximising an inference-time win rate W(T(pi) > T(pi_ref)) under a KL
budget is the RLHF optimum pi* ∝ pi_ref exp(R / beta) for a *transformed calibrated* reward
R = Phi(C_hat(x, y)). So CTRL is ordinary KL-regularised RL with that reward (C_hat and the
transforms raw, identity, log and exp(t) are in ``calibrated_reward.py``).

With ``--reward gold`` r is the world's gold reward, calibrated against its own pi_ref samples
(``--stage calibrate --reward gold``): a perfect reward model, to measure what the RL reaches when the
reward is one the policy can learn. ``--reward scaled`` is the reward model times a per-prompt scale,
InfAlign's reason to calibrate (the calibrated transforms ignore it; raw RLHF does not).

The RL solver (the choices, stated precisely):

- Samples: for each prompt, G responses from the current policy (temperature 1).
- KL estimator (``--kl``), over the response positions s_t (the end-of-turn token included). By the
  chain rule of KL, KL(pi || pi_ref) = E_pi[sum_t KL(pi(. | s_t) || pi_ref(. | s_t))]; its gradient has
  two parts, the KL at the positions visited (differentiated where it stands) and the score-function
  term (each token's action changes which positions come after it). The default, ``analytic``:
  the exact next-token KL over the whole vocabulary at every visited position, under pi_old, summed
  over the positions *after* token t and subtracted from token t's reward (the score-function part),
  plus ``beta * sum_t KL(pi_theta(. | s_t) || pi_ref(. | s_t))`` in the loss, differentiated (the rest).
  Every token the policy makes likelier at a visited position is charged there, sampled or not.
  ``sampled``: the single-sample (k1) estimate ``kl(y) = sum_t [log pi_old(y_t | s_t) - log pi_ref(y_t |
  s_t)]``, a penalty in the reward ``R_total = R - beta * kl(y)``, whose score-function gradient is the
  whole gradient; a token pi_ref finds unlikely is charged only once it is sampled, and then the whole
  sequence shares the charge. On the default run's training prompts the k1 policy spends 0.093 of its
  0.274 nats on responses outside pi_ref's support (garbled words), the analytic one 0.047 of 0.224, and
  its BoN_4 gap to the optimum at the KL it reached shrinks from 0.049 to 0.034 (``ctrl-levers``).
  Both are unbiased (``tests/test_ctrl.py`` enumerates a two-token problem); the analytic one costs a
  forward pass of the policy per step and one of pi_ref per epoch (245 s against 192 s on 2 CPU cores).
- Baseline: leave-one-out (RLOO), ``A_i = R_total_i - mean_{j != i} R_total_j`` within a prompt's group,
  R_total = R - beta * (the sequence's summed KL terms).
- Three options, off by default: ``--kl_to_go`` (with ``--kl sampled``) penalises each token by the k1 of the
  tokens from it on (the same gradient in expectation, less noise: the KL before a token does not depend on it);
  ``--warm_samples`` first fits the optimum's log-ratio on pi_ref's samples (``warm_start``, at ``--warm_lr``);
  ``--lr_decay`` lowers the rate to a tenth over the run (cosine). None of them, nor G, epochs, rate or steps,
  brings BoN_4 (``python -m minialign.lab ctrl-levers``: the default run) or WoN_4 (``won-levers``: the study's
  exp(-4) run) within 0.03 of the optimum. The policies keep 2-8% of their mass in pi_ref's bottom quarter by r
  (the optimum 0.0-1.6%), which a sampled policy gradient drains ever more slowly: its push on a response is
  proportional to how often it is drawn (4x the steps: WoN_4 gap 0.084 -> 0.050).
- Update: ``ppo_epochs`` passes over the batch with the PPO-clipped per-token ratio
  ``pi_theta(y_t) / pi_old(y_t)``; per sequence the token terms are summed (the sequence's log-prob),
  and sequences are averaged. Each pass accumulates gradients over micro-batches of rows sorted by
  length, each cut to its longest row: the whole batch's step, without computing padding.

The paper solves the same objective with PPO (a learned value function as the baseline). The leave-one-out
baseline estimates the same gradient: the other samples of a prompt are independent of sample i, so E[grad log
pi(y_i) * mean_{j != i} R_j] = 0 and subtracting it changes the variance of the policy gradient, not its
expectation. A critic's value baseline is likewise a function of what precedes the sampled tokens, so it too
leaves the expectation unchanged: the two differ in variance (and in what they cost: G samples per prompt here,
a value network there), not in the objective. Both take the same PPO-clipped steps; on the first pass the ratio
is 1 (up to rounding) and the clipped and plain gradients agree.

The same three functions (``transformed_reward``, ``rloo_advantages``, ``ppo_loss``) drive the exact finite
check in the tests, where a categorical policy over a fixed response set must converge to
``softmax(log pi_ref + R / beta)``.
"""
import copy
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from . import world
from .calibrate import calibration_folder, load_calibration
from .calibrated_reward import TRANSFORMS, calibrated, transformed_reward
from .checkpoint import load_model, load_state, load_weights, world_seed
from .config import arg, named
from .data import load_prompts, pad_with_lengths
from .distributed import setup, shard, wrap
from .evaluate import compare_policies
from .model import GPT, micro_batches, next_token_logprobs, token_logprobs
from .reward_model import REWARDS, reward_function
from .sampling import generate, response_text, stop_ids
from .tokenizer import get_tokenizer
from .training import (MetricsLog, TrainingState, check_resume, clip_gradients, cosine_lr, make_optimizer, pick_device,
                       set_lr)

def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages (P, G): each sample's reward minus the mean of its G-1 siblings."""
    G = rewards.size(1)
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (G - 1)


def ppo_loss(logp: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
             clip: float) -> torch.Tensor:
    """PPO-clipped policy-gradient loss. logp, logp_old, mask: (B, T); advantages: (B,), one per
    sequence, or (B, T), one per token.

    Per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) with ratio = pi / pi_old; summed over
    a sequence's tokens, averaged over sequences. At ratio 1 its gradient is the REINFORCE gradient.
    """
    ratio = torch.exp(logp - logp_old)  # (B, T)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    objective = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    return -(objective * mask).sum() / logp.size(0)


def state_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """KL(pi(. | s_t) || pi_ref(. | s_t)) over the whole vocabulary at each position, from the two
    next-token log-probability tables: (B, T, V) x 2 -> (B, T)."""
    return (logp.exp() * (logp - logp_ref)).sum(-1)


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The analytic estimator's direct term: each sequence's sum over its response positions of the exact
    next-token KL, averaged over sequences (as ``ppo_loss``). logp, logp_ref: (B, T, V); mask: (B, T)."""
    return (state_kl(logp, logp_ref) * mask).sum() / logp.size(0)


@torch.no_grad()
def token_kls(policy, reference, ids: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor, estimator: str,
              micro_batch: int, lengths: torch.Tensor) -> torch.Tensor:
    """Each response position's KL term (B, T-1), 0 off the ``mask``, ``micro_batch`` rows at a time:

    - ``sampled``: k1 of the drawn token, log pi_old(y_t | s_t) - log pi_ref(y_t | s_t);
    - ``analytic``: KL(pi_old(. | s_t) || pi_ref(. | s_t)) over the whole vocabulary.

    Either way their sum over a sequence estimates its KL, without bias: KL(pi || pi_ref) over sequences
    is E_pi[sum_t KL(pi(. | s_t) || pi_ref(. | s_t))] (the chain rule of KL)."""
    out = torch.zeros_like(mask)  # (B, T-1)
    for rows, w in micro_batches(ids, micro_batch, lengths):
        logp_ref = next_token_logprobs(reference, ids[rows, :w])  # (b, w - 1, V)
        if estimator == "analytic":
            out[rows, : w - 1] = state_kl(next_token_logprobs(policy, ids[rows, :w]), logp_ref)
        else:
            out[rows, : w - 1] = logp_old[rows, : w - 1] - logp_ref.gather(-1, ids[rows, 1:w, None]).squeeze(-1)
    return out * mask


def token_advantages(R: torch.Tensor, kl_tokens: torch.Tensor, beta: float, estimator: str,
                     kl_to_go: bool = False) -> torch.Tensor:
    """The advantages of a batch: R (P, G) rewards Phi(C_hat), ``kl_tokens`` (B = P * G, T) from ``token_kls``.

    Each sample's return is R - beta * (its sequence's KL), and its advantage the return minus the mean of
    its G - 1 siblings' (RLOO). A token's action cannot change what came before it, so it may drop that
    part of the KL (the gradient's expectation is unchanged, its noise is not): with ``analytic`` token t
    keeps only the KL of the positions after it (its own position's KL is differentiated directly, in
    ``kl_penalty``), with ``sampled`` and ``kl_to_go`` the k1 of its own token and those after. Returns
    (B, T) per token, or (B,) per sequence (``sampled`` without ``kl_to_go``)."""
    penalised = R - beta * kl_tokens.sum(1).view_as(R)  # (P, G): R_total = Phi(C_hat) - beta * KL(y)
    advantages = rloo_advantages(penalised).flatten()  # (B,): minus the mean of the prompt's other samples
    if estimator == "analytic":
        return advantages[:, None] + beta * kl_tokens.cumsum(1)  # (B, T): the KL of positions <= t added back
    if kl_to_go:
        return advantages[:, None] + beta * (kl_tokens.cumsum(1) - kl_tokens)  # (B, T): positions < t added back
    return advantages


def ppo_step(model, policy, optimizer, ids, logp_old, mask, advantages, clip: float, micro_batch: int,
             lengths: torch.Tensor | None = None, reference=None, beta: float = 0.0) -> None:
    """One optimizer step on the PPO loss of the whole batch (plus ``beta`` times ``kl_penalty`` against
    ``reference`` when given: the analytic KL estimator), accumulated over micro-batches of rows.

    ``ppo_loss`` averages over sequences, so each micro-batch's loss is weighted by its share of the
    rows and the accumulated gradient is the whole batch's. With the rows' real ``lengths`` (B,) rows of
    similar length run together, each micro-batch cut to its longest row (``model.micro_batches``).
    ``model`` is what runs the forward (the DDP wrapper under torchrun, which averages each backward
    across ranks), ``policy`` the module whose gradients are clipped."""
    optimizer.zero_grad(set_to_none=True)
    for rows, w in micro_batches(ids, micro_batch, lengths):
        adv = advantages[rows] if advantages.dim() == 1 else advantages[rows, : w - 1]  # (b,) or (b, w - 1)
        logp_all = next_token_logprobs(model, ids[rows, :w])  # (b, w - 1, V)
        logp = logp_all.gather(-1, ids[rows, 1:w, None]).squeeze(-1)  # (b, w - 1)
        loss = ppo_loss(logp, logp_old[rows, : w - 1], mask[rows, : w - 1], adv, clip)
        if reference is not None:  # the analytic estimator: beta * sum_t KL(pi(. | s_t) || pi_ref(. | s_t)), differentiated
            with torch.no_grad():
                logp_ref = next_token_logprobs(reference, ids[rows, :w])  # (b, w - 1, V)
            loss = loss + beta * kl_penalty(logp_all, logp_ref, mask[rows, : w - 1])
        (loss * (len(rows) / ids.size(0))).backward()
    clip_gradients(policy.parameters(), "ctrl", "try a lower --lr, or a --beta and --t that keep the rewards small")
    optimizer.step()


def print_summary(metrics: dict, n: int) -> None:
    """The CTRL policy against pi_ref, BoN/WoN picked by r, judged by r and (on the world) by gold."""
    if not metrics:
        print("\nCTRL: no final evaluation (--eval_prompts 0).")
        return
    judges = [j for j in ("r", "gold") if f"win_rate_{j}" in metrics]
    print("\nCTRL policy vs pi_ref on held-out prompts (BoN/WoN pick by r):")
    print(f"  {'judged by':32s} " + "".join(f"{j:>16s}" for j in judges))
    for label, key in (("standard win rate", "win_rate"), (f"BoN_{n} inference-time win rate", f"bon{n}"),
                       (f"WoN_{n} inference-time win rate", f"won{n}")):
        print(f"  {label:32s} " + "".join(f"{metrics[f'{key}_{j}']:>9.3f} ± {metrics[f'{key}_{j}_se']:.3f}"
                                           for j in judges))
    for label, key in (("KL(pi || pi_ref), nats", "kl"), ("harm rate (harmful prompts)", "harm_rate"),
                       ("attack success (attacked prompts)", "attack_success"), ("help rate (benign prompts)", "help_rate")):
        if key in metrics:  # harm and help rates exist on world prompts only
            print(f"  {label:32s} {metrics[key]:.3f}")


@dataclass
class CTRLConfig:
    out_dir: str = arg("out", "checkpoints root (reads sft, reward, calibration; writes <out_dir>/ctrl...)", form=named)
    reward: str = arg("model", "the reward r: model (out/reward), gold (the world's: a perfect reward model) or "
                               "scaled (out/reward times a per-prompt scale); calibrated by `--stage calibrate "
                               "--reward` the same", one_of=REWARDS)
    transform: str = arg("exp", "reward transform: raw | identity | log | exp", one_of=TRANSFORMS)
    t: float = arg(4.0, "exponent of the exp transform (> 0 for best-of-N, < 0 for worst-of-N)")
    beta: float = arg(20.0, "KL penalty coefficient (scale with the transform: exp(4u) spans 1..55)", above=0)
    steps: int = arg(40, "RL steps", at_least=1)
    prompts_per_step: int = arg(16, "prompts per step", at_least=1)
    group: int = arg(8, "samples per prompt (G) for the leave-one-out baseline", at_least=2)
    ppo_epochs: int = arg(2, "passes over each batch", at_least=1)
    warm_samples: int = arg(0, "pi_ref samples per prompt for the warm start, which fits the optimum's log-ratio "
                               "R / beta - log Z offline before the RL (ctrl.warm_start); 0 = none", at_least=0)
    warm_epochs: int = arg(2, "passes of the warm start's fit over its samples", at_least=1)
    warm_lr: float = arg(0.0, "learning rate of the warm start's fit; 0 = --lr", at_least=0)
    kl: str = arg("analytic", "KL estimator: analytic (the exact next-token KL at every visited position: "
                              "differentiated there, and the later positions' in each token's advantage) or "
                              "sampled (k1 of the drawn tokens, a penalty in the reward)", one_of=("analytic", "sampled"))
    kl_to_go: bool = arg(False, "penalise each token by the KL of the tokens from it on, not the whole sequence's "
                                "(the same gradient in expectation: a token cannot change the tokens before it)")
    micro_batch: int = arg(32, "rows per forward/backward in the update, rows of similar length together (gradient "
                                "accumulation; less padding); 0 = all at once. GPT-2: 16", at_least=0)
    clip: float = arg(0.2, "PPO ratio clip epsilon", above=0)
    lr: float = arg(1e-4, "learning rate (higher rates overshoot the exact optimum's KL within 40 steps)", above=0)
    lr_decay: bool = arg(False, "decay the learning rate from --lr to a tenth of it over --steps (cosine) instead of "
                                "keeping it constant")
    max_new_tokens: int = arg(128, "longest sampled response", at_least=1)
    eval_n: int = arg(4, "N of the best-of-N / worst-of-N inference-time win rates", at_least=1)
    eval_prompts: int = arg(32, "held-out prompts per kind in the final evaluation; 0 = none (a sweep that "
                                "evaluates its policies itself)", at_least=0)
    eval_data: str = arg("", "prompt file for the final evaluation, judged by r; '' = held-out world prompts (gold)")
    eval_samples: int = arg(8, "samples per prompt and policy in the final evaluation", at_least=1)
    name: str = arg("", "checkpoint folder name under out_dir; '' = ctrl")
    save_every: int = arg(10, "steps between checkpoints", at_least=1)
    seed: int = arg(0, "seed of the prompt order and the samples")
    resume: bool = arg(False, "continue from the checkpoint's state.pt")
    device: str = arg("auto", "auto, cpu or cuda")


def ctrl_folder(cfg: CTRLConfig) -> str:
    return f"{cfg.out_dir}/{cfg.name or 'ctrl'}"


def rl_update(ddp, policy, reference, optimizer, rows: list[list[int]], responses: list[list[int]],
              logp_old_tokens: list[torch.Tensor], R: torch.Tensor, cfg: "CTRLConfig", device) -> torch.Tensor:
    """CTRL's update on one batch of samples: each position's KL term (``cfg.kl``: sampled or analytic), the
    KL-penalised reward's leave-one-out advantages and ``ppo_epochs`` PPO steps. rows / responses: B = P * G
    token lists grouped by prompt; ``logp_old_tokens``: each response token's log pi_old (what the sampler
    drew it with); R: (P, G) transformed rewards Phi(C_hat). Returns each sample's sequence KL estimate (B,)."""
    ids, mask, lengths = pad_with_lengths(rows, responses, device)  # (B, T), (B, T-1), (B,)
    logp_old = torch.zeros_like(mask)  # (B, T-1): log pi_old where mask is 1
    logp_old[mask.bool()] = torch.cat(logp_old_tokens).to(device)
    kl_tokens = token_kls(policy, reference, ids, logp_old, mask, cfg.kl, cfg.micro_batch, lengths)  # (B, T-1)
    advantages = token_advantages(R, kl_tokens, cfg.beta, cfg.kl, cfg.kl_to_go)  # (B,) or (B, T-1)
    direct = reference if cfg.kl == "analytic" else None  # the analytic estimator differentiates each position's KL
    for _ in range(cfg.ppo_epochs):
        ppo_step(ddp, policy, optimizer, ids, logp_old, mask, advantages, cfg.clip, cfg.micro_batch, lengths,
                 direct, cfg.beta)
    return kl_tokens.sum(1)  # (B,) each sample's sequence KL


def optimum_log_ratio(raw: torch.Tensor, sorted_reference: torch.Tensor, transform: str, t: float,
                      beta: float) -> torch.Tensor:
    """log pi*(y|x) / pi_ref(y|x) = R / beta - log Z(x) of responses with rewards r ``raw`` (P, S), where
    R = Phi(C_hat) and Z(x) = mean_k exp(R_k / beta) over the calibration set's sorted rewards (P, K),
    each calibrated against the set itself: the exact optimum's log-ratio for pi_ref = the calibration."""
    R = transformed_reward(transform, t, raw, sorted_reference).double()  # (P, S)
    R_cal = transformed_reward(transform, t, sorted_reference, sorted_reference).double()  # (P, K)
    log_z = torch.logsumexp(R_cal / beta, 1) - torch.log(torch.tensor(float(sorted_reference.size(1))))  # (P,)
    return (R / beta - log_z[:, None]).float()  # (P, S)


def warm_start(ddp, policy, reference, run: TrainingState, reward, tokenizer, prompts: list[str],
               prompt_ids: list[list[int]], sorted_reference: torch.Tensor, cfg: "CTRLConfig", d) -> dict:
    """An optional start (``--warm_samples``): the same objective solved offline on pi_ref's samples.

    The optimum pi*(y|x) = pi_ref(y|x) exp(R(x, y) / beta) / Z(x) is the one policy whose log-ratio
    log pi / pi_ref equals R / beta - log Z(x) on every response. So ``warm_samples`` responses per prompt
    are drawn from pi_ref (their log pi_ref is what the sampler drew them with), scored R = Phi(C_hat),
    and the policy is fitted to that log-ratio by least squares for ``warm_epochs`` passes, one optimizer
    step per micro-batch; Z(x) is the calibration set's, mean_k exp(R_k / beta) over its K rewards each
    calibrated against the set itself (what the exact optimum on the calibration uses). The RL then goes
    on from the fitted policy. Returns the fit's first and last mean squared error."""
    pick = shard(torch.arange(len(prompts)), d)  # (P,) this rank's prompts
    picked = [i for i in pick.tolist() for _ in range(cfg.warm_samples)]
    rows = [prompt_ids[i] for i in picked]
    responses, logp_tokens = generate(reference, rows, cfg.max_new_tokens, stop_ids(tokenizer), temperature=1.0,
                                      generator=run.generators["sample_generator"], keep_stop=True, logprobs=True)
    texts = [response_text(tokenizer, r, stop_ids(tokenizer)) for r in responses]
    raw = reward([prompts[i] for i in picked], texts).view(-1, cfg.warm_samples)  # (P, S): r
    target = optimum_log_ratio(raw, sorted_reference[pick], cfg.transform, cfg.t, cfg.beta).flatten().to(d.device)  # (B,)
    logp_ref = torch.stack([lp.sum() for lp in logp_tokens]).to(d.device)  # (B,) log pi_ref(y | x)
    ids, mask, lengths = pad_with_lengths(rows, responses, d.device)  # (B, T), (B, T-1), (B,)
    size = cfg.micro_batch or len(rows)
    errors = []
    policy.train()
    set_lr(run.optimizer, cfg.warm_lr or cfg.lr)
    for _ in tqdm(range(cfg.warm_epochs), desc="ctrl warm start", dynamic_ncols=True, disable=not d.is_main):
        order = torch.randperm(len(rows), generator=run.generators["generator"])
        for chunk in order.split(size):
            w = int(lengths[chunk].max())  # each micro-batch cut to its longest row
            logp = (token_logprobs(ddp, ids[chunk, :w]) * mask[chunk, : w - 1]).sum(1)  # (b,) log pi(y | x)
            loss = ((logp - logp_ref[chunk] - target[chunk]) ** 2).mean()  # least squares on the log-ratio
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(policy.parameters(), "ctrl warm start", "try a lower --lr or fewer --warm_epochs")
            run.optimizer.step()
            errors.append(loss.item())
    set_lr(run.optimizer, cfg.lr)  # the RL's own rate from here
    per_epoch = len(errors) // cfg.warm_epochs
    return {"warm_mse_first": round(sum(errors[:per_epoch]) / per_epoch, 4),
            "warm_mse_last": round(sum(errors[-per_epoch:]) / per_epoch, 4)}


def evaluation_prompts(cfg: "CTRLConfig") -> list[str]:
    """The final evaluation's held-out prompts, read before training so a bad file stops the run first:
    ``--eval_data``'s, the world's held-out prompts, or none (``--eval_prompts 0``)."""
    if cfg.eval_data:
        return load_prompts(cfg.eval_data)
    return [p.text for p in world.eval_prompts(cfg.eval_prompts, world_seed(cfg.out_dir))] if cfg.eval_prompts else []


def final_evaluation(policy, reference, reward, tokenizer, eval_prompts: list[str], cfg: "CTRLConfig") -> dict:
    """The policy against pi_ref on ``eval_prompts``: the world's, judged by r and by the gold reward,
    or ``--eval_data``'s, judged by r alone (real data has no gold reward). ``reward`` is r: the reward
    model, or the gold reward itself under ``--reward gold`` (then the two judges agree)."""
    return compare_policies(policy.eval(), reference, tokenizer, eval_prompts, cfg.eval_samples, cfg.eval_n,
                            reward, cfg.max_new_tokens, cfg.seed)


def ctrl_step(ddp, policy, reference, run: TrainingState, reward, tokenizer, prompts: list[str],
              prompt_ids: list[list[int]], sorted_reference: torch.Tensor, cfg: CTRLConfig, d) -> dict:
    """One CTRL step: G samples of each of this step's prompts from the policy, their reward Phi(C_hat),
    and ``rl_update``. Returns the step's mean reward, KL and win rate against pi_ref under r."""
    order = torch.randperm(len(prompts), generator=run.generators["generator"])
    pick = shard(order[: cfg.prompts_per_step], d)  # (P,) this rank's prompts of the step
    picked = [i for i in pick.tolist() for _ in range(cfg.group)]  # each prompt G times
    rows = [prompt_ids[i] for i in picked]
    policy.eval()
    responses, logp_old = generate(policy, rows, cfg.max_new_tokens, stop_ids(tokenizer), temperature=1.0,
                                   generator=run.generators["sample_generator"], keep_stop=True, logprobs=True)
    policy.train()
    texts = [response_text(tokenizer, r, stop_ids(tokenizer)) for r in responses]  # as calibration scores them
    raw = reward([prompts[i] for i in picked], texts).view(-1, cfg.group)  # (P, G): r
    R = transformed_reward(cfg.transform, cfg.t, raw, sorted_reference[pick])  # (P, G): Phi(C_hat)
    kl = rl_update(ddp, policy, reference, run.optimizer, rows, responses, logp_old, R.to(d.device), cfg, d.device)
    win = calibrated(sorted_reference[pick], raw).mean()  # mean C_hat = win rate vs pi_ref under r
    return {"reward": round(float(raw.mean()), 4), "kl": round(float(kl.mean()), 4), "win_rate_r": round(float(win), 4)}


def train_ctrl(cfg: CTRLConfig) -> tuple[GPT, dict]:
    """Run CTRL from pi_ref = out/sft with r = out/reward and the cached calibration (one process, or one
    rank under torchrun); rank 0 evaluates at the end. Returns the policy and the evaluation summary."""
    d = setup(pick_device(cfg.device))
    folder = ctrl_folder(cfg)
    eval_prompts = evaluation_prompts(cfg)  # first: a bad prompt file stops the run before it trains
    reference, meta = load_model(f"{cfg.out_dir}/sft")
    tokenizer = get_tokenizer(meta["tokenizer"])
    reward = reward_function(cfg.reward, cfg.out_dir, d.device, tokenizer)  # r, or the gold reward
    prompts, sorted_reference = load_calibration(calibration_folder(cfg.out_dir, cfg.reward))  # (prompts, K)
    policy = copy.deepcopy(reference)
    if cfg.resume:
        # a constant learning rate: more steps extend the same run; a decaying one is set by --steps
        check_resume(folder, cfg, free=() if cfg.lr_decay else ("steps",))
        load_weights(folder, policy)
    reference.to(d.device).eval().requires_grad_(False)
    policy.to(d.device).train()
    ddp = wrap(policy, d)
    run = TrainingState(make_optimizer(policy, cfg.lr, 0.0, d.device),
                        {"generator": torch.Generator().manual_seed(cfg.seed),  # the same prompt order on every rank
                         "sample_generator": torch.Generator(d.device).manual_seed(cfg.seed + 1 + d.rank)},  # by rank
                        load_state(folder) if cfg.resume else None, f"{folder}/state.pt")
    log = MetricsLog(f"{cfg.out_dir}/logs/{cfg.name or 'ctrl'}.jsonl", enabled=d.is_main)
    prompt_ids = [tokenizer.encode(p) for p in prompts]

    def checkpoint(metrics: dict) -> None:
        if d.is_main:
            run.save(folder, policy, {"stage": "ctrl", "model": asdict(policy.config), "tokenizer": tokenizer.name,
                                      "precision": "fp32",  # rollouts and PPO ratios: no autocast, on every device
                                      "config": asdict(cfg), "step": run.step, "metrics": metrics})

    if cfg.warm_samples and run.step == 0:  # a resumed run was warm-started already
        fit = warm_start(ddp, policy, reference, run, reward, tokenizer, prompts, prompt_ids, sorted_reference, cfg, d)
        log.write(step=0, **fit)
    # a context manager: the progress bar is closed on an error too, so the error's sentence starts a line
    with tqdm(total=cfg.steps, initial=run.step, desc=f"ctrl[{cfg.transform}]", dynamic_ncols=True,
              disable=not d.is_main) as bar:
        while run.step < cfg.steps:
            if cfg.lr_decay:
                set_lr(run.optimizer, cosine_lr(run.step, cfg.steps, cfg.lr, warmup=0))
            stats = ctrl_step(ddp, policy, reference, run, reward, tokenizer, prompts, prompt_ids, sorted_reference, cfg, d)
            run.step += 1
            metrics = {"step": run.step, **stats}
            log.write(**metrics)
            bar.set_postfix(reward=metrics["reward"], kl=metrics["kl"], win=metrics["win_rate_r"], refresh=False)
            bar.update(1)
            if run.step % cfg.save_every == 0 and run.step < cfg.steps:
                checkpoint(metrics)
    if not d.is_main:
        return policy, {}
    summary = final_evaluation(policy, reference, reward, tokenizer, eval_prompts, cfg) if eval_prompts else {}
    log.write(step=run.step, final=summary)
    checkpoint(summary)
    print_summary(summary, cfg.eval_n)
    return policy, summary
