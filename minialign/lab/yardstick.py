"""The yardstick of trained CTRL: a policy beside the exact optimum of its own training reward.

A CTRL policy is judged at the KL it reached: by how far its win rates stay below those of the optimum
pi* ∝ pi_ref exp(Phi(C_hat) / beta) with the same KL (``tilt.py``). Each side is read as exactly as the
world allows:

- **pi_ref**: each prompt's *distinct* responses among ``samples`` draws, each with its exact
  probability under pi_ref (one forward pass), renormalised over the set (``exact_support``). The
  world's replies repeat (on the default pipeline about 35 distinct among 256 draws per prompt, holding
  about 94% of pi_ref's mass), so the set is nearly all of pi_ref. A support of K draws, each 1/K,
  instead gives a response rarer than 1/K too much mass when it is drawn: its optimum buys such a
  response, if it scores at the top, for too little KL, and reads higher than the true one.
- **the optimum**: the tilt of that support by the reward CTRL trained on, Phi(C_hat) with C_hat against
  the calibration set CTRL trained with; on prompts CTRL never calibrated (held-out ones), by the
  support's exact C, the pi_ref mass below a reward plus half the mass tied with it.
- **the policy**: ``samples`` responses of its own, scored against pi_ref's exact support (win rates),
  and their sequence log-ratios log pi / pi_ref (the KL it spent, including on responses outside
  pi_ref's support: ``kl_off_support``).

The gaps are per prompt (trained - optimum at the KL reached), averaged with their standard error across
prompts: the pairing removes the prompts' own spread from the comparison.
"""
import math

import torch

from .. import tilt, world
from ..calibrate import calibration_folder, load_calibration
from ..calibrated_reward import transform_calibrated, transformed_reward
from ..data import pad_with_lengths
from ..evaluate import mass_below, mean_and_se, sample_responses, win_rates
from ..model import sequence_logprobs
from ..reward_model import prompt_scale, score
from ..sampling import generate, response_text, stop_ids

RATES = ("win_rate", "bon", "won")
BOTTOM = 0.1  # the bottom tenth of pi_ref by the selector: where a worst-of-N's picks come from


def transform_label(transform: str, t: float) -> str:
    return transform + (f"({t:+g})" if transform == "exp" else "")


def selector_of(reward: str | None) -> str:
    """The support column (``"r"`` or ``"gold"``) that CTRL on ``reward`` (``--reward``: model, gold or
    scaled) trains and picks by: r with a per-prompt scale keeps r's per-prompt order, so its win rates."""
    return "gold" if reward == "gold" else "r"


def trained_on(ctrl: dict) -> str:
    """The reward a CTRL checkpoint is set beside, by its config (``selector_of`` its ``reward``; older
    runs without one were trained on r)."""
    return selector_of(ctrl.get("reward"))


def trained_transform(ctrl: dict) -> str:
    """The transform a CTRL checkpoint optimised, by its config: "raw, scaled" for raw RLHF on r with a
    per-prompt scale (``--reward scaled``), else its ``transform``."""
    return "raw, scaled" if ctrl["transform"] == "raw" and ctrl.get("reward") == "scaled" else ctrl["transform"]


def kl_by_kind(per_prompt: torch.Tensor, prompts: list[world.Prompt]) -> dict:
    """Where a policy spends its KL: the mean of the per-prompt KLs (P,) over each kind of prompt, as
    ``kl_benign``, ``kl_harmful``, ``kl_attacked`` (nan for a kind without prompts). A calibrated
    transform's optimum spends the same KL on every prompt (C_hat is uniform on each), so a trained
    policy that spends it unevenly is off its optimum."""
    return {f"kl_{kind}": float(per_prompt[[i for i, p in enumerate(prompts) if p.kind == kind]].mean())
            for kind in world.KIND_MIX}


def bottom_share(weights: torch.Tensor, values: torch.Tensor, support: torch.Tensor,
                 reference: torch.Tensor | None = None) -> torch.Tensor:
    """Per prompt (P,): the probability ``weights`` (P, M) puts on responses whose ``values`` (P, M) are at
    or below pi_ref's bottom tenth: the lowest ``support`` value (P, K) at which pi_ref's mass, in its
    ``reference`` weights (P, K; default uniform: the ceil(K / 10)-th lowest), reaches a tenth. A policy
    that keeps mass there loses WoN_N: worst-of-N finds those responses."""
    reference = tilt.uniform(support) if reference is None else reference
    order = support.argsort(1)
    below = reference.gather(1, order).cumsum(1) < BOTTOM - 1e-6  # (P, K): pi_ref's mass still short of a tenth
    cut = support.gather(1, order).gather(1, below.sum(1, keepdim=True))  # (P, 1)
    return (weights * (values <= cut)).sum(1)


def ctrl_training_prompts(out_dir: str) -> list[world.Prompt]:
    """Every other prompt of the calibration CTRL trains on (96 of the default 192): where a trained
    policy is set beside the optimum with no generalisation between them."""
    return [world.parse_prompt(p) for p in load_calibration(calibration_folder(out_dir, "model"))[0][::2]]


def calibration_of(out_dir: str, ctrl: dict, prompts: list[world.Prompt]) -> torch.Tensor | None:
    """The sorted calibration rewards (P, K) a CTRL run (its config ``ctrl``, its checkpoints root
    ``out_dir``) trained on for each of ``prompts``, or None where it calibrated not all of them (held-out
    prompts: ``training_phi`` then takes the exact C)."""
    texts, rewards = load_calibration(calibration_folder(out_dir, ctrl.get("reward") or "model"))
    row = {text: i for i, text in enumerate(texts)}
    if not all(p.text in row for p in prompts):
        return None
    return rewards[[row[p.text] for p in prompts]]


def padded(rows: list[torch.Tensor], width: int, fill: float = 0.0) -> torch.Tensor:
    """Rows of different lengths as one (P, width) float64 tensor, ``fill`` after each row's end."""
    out = torch.full((len(rows), width), fill, dtype=torch.float64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


@torch.no_grad()
def support_logprobs(model, tokenizer, prompts: list[world.Prompt], responses: list[list[list[int]]]) -> torch.Tensor:
    """log model(y | x) of each prompt's ``responses`` (token lists), exactly (one forward pass each):
    (P, M) float64, -inf on the padding after a prompt's last response."""
    device = model.lm_head.weight.device
    logp = []
    for p, ys in zip(prompts, responses):
        ids, mask, lengths = pad_with_lengths([tokenizer.encode(p.text)] * len(ys), ys, device)  # (M_j, T), (M_j, T-1), (M_j,)
        logp.append((sequence_logprobs(model, ids, 64, lengths) * mask).sum(1).double().cpu())  # (M_j,)
    return padded(logp, max(len(ys) for ys in responses), fill=-math.inf)


@torch.no_grad()
def exact_support(model, reward_model, tokenizer, prompts: list[world.Prompt], samples: int, seed: int) -> dict:
    """Each prompt's distinct responses among ``samples`` pi_ref draws (``model`` is pi_ref), with their
    exact pi_ref probabilities renormalised over the set: ``reference`` (P, M), 0 on the padding after a
    prompt's last response; their rewards ``r`` and ``gold`` (P, M); ``texts`` and token lists
    ``responses`` (the stop token kept); ``covered`` (P,), the
    pi_ref mass of each set; ``scale`` (P, 1), each prompt's scale for "raw, scaled"."""
    device = model.lm_head.weight.device
    stop = stop_ids(tokenizer)
    rows = [tokenizer.encode(p.text) for p in prompts for _ in range(samples)]
    g = torch.Generator(device).manual_seed(seed)
    drawn = []
    for i in range(0, len(rows), 256):
        drawn += generate(model, rows[i: i + 256], 128, stop, temperature=1.0, generator=g, keep_stop=True)
    r, gold, texts, responses = [], [], [], []
    for j, p in enumerate(prompts):
        distinct = [list(y) for y in sorted({tuple(y) for y in drawn[j * samples: (j + 1) * samples]})]
        responses.append(distinct)
        texts.append([response_text(tokenizer, y, stop) for y in distinct])
        r.append(score(reward_model, tokenizer, [p.text] * len(distinct), texts[-1]).double().cpu())
        gold.append(torch.tensor([world.gold_reward(p.text, y) for y in texts[-1]], dtype=torch.float64))
    width = max(len(t) for t in texts)
    mass = support_logprobs(model, tokenizer, prompts, responses).exp()  # (P, M): pi_ref's probabilities, 0 on padding
    return {"reference": mass / mass.sum(1, keepdim=True), "covered": mass.sum(1), "r": padded(r, width),
            "gold": padded(gold, width), "texts": texts, "responses": responses,
            "scale": prompt_scale([p.text for p in prompts])[:, None]}


def exact_calibrated(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """C of each support response (P, M): pi_ref's mass of lower values plus half its mass of equal ones,
    under the ``reference`` weights (P, M). Never 0 where pi_ref has mass: a response ties with itself."""
    less, not_greater = mass_below(values, reference)
    return less + 0.5 * (not_greater - less)


def training_phi(ctrl: dict, support: dict, calibration: torch.Tensor | None) -> torch.Tensor:
    """Phi of each support response (P, M) under the reward a CTRL run (its config ``ctrl``) trained on:
    C_hat against its ``calibration`` (sorted rewards, (P, K)), or the support's exact C without one; the
    raw transforms take the reward itself (times each prompt's scale for "raw, scaled"). 0 on padding."""
    values = support[trained_on(ctrl)]
    transform = trained_transform(ctrl)
    if transform in ("raw", "raw, scaled"):
        phi = values * (support["scale"] if transform == "raw, scaled" else 1.0)
    elif calibration is not None:
        phi = transformed_reward(transform, ctrl["t"], values.float(), calibration.float()).double()
    else:
        phi = transform_calibrated(transform, ctrl["t"], exact_calibrated(values, support["reference"]))
    return phi.masked_fill(support["reference"] == 0, 0.0)


def trained_against_optimum(policy, reference, reward_model, tokenizer, prompts: list[world.Prompt], support: dict,
                            ctrl: dict, n: int, samples: int, seed: int,
                            calibration: torch.Tensor | None = None) -> list[dict]:
    """A trained CTRL policy (its config ``ctrl``), the optimum of its own (transform, beta) and the optimum
    at the KL the policy reached, on ``support`` (``exact_support`` of ``prompts``): rows of KL, where it
    is spent (``kl_by_kind``), the share in pi_ref's bottom tenth by the selector (``bottom``: mean over
    prompts; ``bottom_worst``: the largest prompt's), and the standard, BoN_n and WoN_n win rates against
    pi_ref, selected by what CTRL trained on and judged by r (the paper's view) and by gold, ± SE across
    prompts. The optimum at the KL reached also carries each rate's paired gap (``<rate>_<judge>_gap``,
    trained - optimum per prompt, and its SE) and the per-prompt gaps (``<rate>_<judge>_gaps``, a list). The
    trained row adds ``kl_off_support``: the KL the policy spent on responses outside pi_ref's support.
    ``calibration``: CTRL's sorted calibration rewards of these prompts (P, K), or None for the exact C
    (held-out prompts)."""
    texts = [p.text for p in prompts for _ in range(samples)]
    responses, log_ratio = sample_responses(policy, tokenizer, [p.text for p in prompts], samples, 128, seed + 11,
                                            reference)
    P, ref = len(prompts), support["reference"]
    own = {"r": score(reward_model, tokenizer, texts, responses).double().view(P, samples),
           "gold": torch.tensor([world.gold_reward(t, y) for t, y in zip(texts, responses)],
                                dtype=torch.float64).view(P, samples)}
    selector = trained_on(ctrl)
    known = [set(t) for t in support["texts"]]
    off = torch.tensor([y not in known[i // samples] for i, y in enumerate(responses)]).view(P, samples)
    log_ratio = log_ratio.double().view(P, samples)
    phi = training_phi(ctrl, support, calibration)  # (P, M)
    kl = float(log_ratio.mean())
    # one support per prompt: the policy's samples (1/samples each) beside pi_ref's exact responses
    on_policy = torch.cat([torch.full_like(own["r"], 1 / samples), torch.zeros_like(ref)], 1)
    on_reference = torch.cat([torch.zeros_like(own["r"]), ref], 1)
    rows, per_prompt_rates = [], []
    at_beta = 1 / ctrl["beta"] if ctrl["beta"] > 0 else math.inf  # beta 0: past the largest KL the support allows
    for label, inverse_beta in (("trained", None), (f"optimum at beta {ctrl['beta']:g}", at_beta),
                                (f"optimum at KL {kl:.2f}", tilt.inverse_beta_at_kl(phi, kl, ref))):
        if inverse_beta is None:  # the policy by its own samples
            kls = log_ratio.mean(1)
            bottom = bottom_share(on_policy[:, :samples], own[selector], support[selector], ref)
            rates = {judge: win_rates(on_policy, on_reference, torch.cat([own[selector], support[selector]], 1),
                                      torch.cat([own[judge], support[judge]], 1), n) for judge in ("r", "gold")}
        else:
            weights = tilt.tilt(phi, inverse_beta, ref)  # (P, M) the optimum on the support
            kls = tilt.kl_to_reference(weights, ref)
            bottom = bottom_share(weights, support[selector], support[selector], ref)
            rates = {judge: win_rates(weights, ref, support[selector], support[judge], n) for judge in ("r", "gold")}
        row = {"point": label, "kl": float(kls.mean()), **kl_by_kind(kls, prompts), "bottom": float(bottom.mean()),
               "bottom_worst": float(bottom.max())}
        for judge in ("r", "gold"):
            summary = mean_and_se(rates[judge])
            for key in RATES:
                row[f"{key}_{judge}"], row[f"{key}_{judge}_se"] = summary[key], summary[key + "_se"]
        rows.append(row)
        per_prompt_rates.append(rates)
    rows[0]["kl_off_support"] = float((log_ratio * off).mean())
    rows[0]["off_support"] = float(off.double().mean())
    rows[0]["covered"] = float(support["covered"].mean())
    for judge in ("r", "gold"):
        for key in RATES:
            gaps = per_prompt_rates[0][judge][key] - per_prompt_rates[2][judge][key]  # (P,)
            gap = mean_and_se({"gap": gaps})
            rows[2][f"{key}_{judge}_gap"], rows[2][f"{key}_{judge}_gap_se"] = gap["gap"], gap["gap_se"]
            rows[2][f"{key}_{judge}_gaps"] = gaps.tolist()  # per prompt: what pairs two policies on the same prompts
    return rows


def trained_markdown(rows: list[dict], ctrl: dict, n: int) -> str:
    """The three rows of ``trained_against_optimum`` as a table, both judges."""
    label = transform_label(trained_transform(ctrl), ctrl["t"])
    lines = [f"CTRL {label}, beta {ctrl['beta']:g}, {ctrl['steps']} steps, trained on {trained_on(ctrl)}, against its "
             f"exact optima (selected by {trained_on(ctrl)}; KL off pi_ref's support "
             f"{rows[0]['kl_off_support']:.3f}):", "",
             f"| {label} | KL | win rate (r) | BoN_{n} (r) | WoN_{n} (r) | win rate (gold) | BoN_{n} (gold) | WoN_{n} (gold) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[f'{key}_{judge}']:.3f} ± {row[f'{key}_{judge}_se']:.3f}"
                 for judge in ("r", "gold") for key in RATES]
        lines.append(f"| {row['point']} | {row['kl']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
