"""The CTRL stage on tiny world checkpoints: it runs after sft -> reward -> calibrate, and resuming
from a checkpoint gives the parameters of an uninterrupted run."""
import csv
import json
import os

import pytest
import torch

from minialign import world
from minialign.lab import ctrl_levers, experiments, infalign_study, paper_gain_trained, won_levers
from minialign.calibrate import CalibrateConfig, load_calibration, run_calibration
from minialign.config import ConfigError
from minialign.checkpoint import load_meta, load_model
from minialign.ctrl import CTRLConfig, train_ctrl
from minialign.reward import RewardConfig, train_reward
from minialign.reward_model import prompt_scale, reward_function
from minialign.sft import SFTConfig, train_sft

TINY = dict(device="cpu")
RL = dict(prompts_per_step=2, group=2, max_new_tokens=12, eval_prompts=2, eval_samples=2, steps=4, save_every=2)


def tiny_sft_and_reward(out: str) -> None:
    """pi_ref and r of one layer after two steps each: checkpoints for the stages after them."""
    train_sft(SFTConfig(out_dir=out, n_layer=1, n_head=2, n_embd=32, block_size=256, batch_size=2, steps=2,
                        corpus_dialogues=100, eval_every=2, **TINY))
    train_reward(RewardConfig(out_dir=out, n_pairs=16, steps=2, batch_size=4, eval_every=2, **TINY))


def test_ctrl_resume_matches_an_uninterrupted_run(tmp_path):
    out = str(tmp_path)
    tiny_sft_and_reward(out)
    run_calibration(CalibrateConfig(out_dir=out, n_prompts=6, k=4, max_new_tokens=12, **TINY))
    summary = train_ctrl(CTRLConfig(out_dir=out, name="full", **RL, **TINY))[1]
    assert {"kl", "bon4_r", "won4_r", "bon4_gold", "won4_gold", "harm_rate", "help_rate"} <= set(summary)
    first = CTRLConfig(out_dir=out, name="split", **{**RL, "steps": 2}, **TINY)
    train_ctrl(first)
    train_ctrl(CTRLConfig(out_dir=out, name="split", resume=True, **RL, **TINY))
    a, b = load_model(f"{out}/full")[0].state_dict(), load_model(f"{out}/split")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref = load_model(f"{out}/sft")[0].state_dict()
    assert not all(torch.equal(a[k], ref[k]) for k in a)  # RL moved the policy
    # the tilt experiment end to end on these checkpoints: tables, plot, and the trained policy beside its optima
    experiments.main(["tilt", f"--out_dir={out}", "--n_eval=1", "--k=4", "--support_draws=6", "--policy_samples=4", "--ctrl=full,split", "--device=cpu"])
    for name in ("tilt.md", "tilt.csv", "tilt_reward_quality.md", "tilt_trained.md"):
        assert os.path.getsize(f"{out}/{name}") > 0
    trained = open(f"{out}/tilt_trained.md").read()
    assert trained.count("| trained |") == 2 and trained.count("optimum at beta 20") == 2
    # r := gold, a perfect reward model: its own calibration, and CTRL judged by the reward it was trained on
    run_calibration(CalibrateConfig(out_dir=out, reward="gold", n_prompts=6, k=4, max_new_tokens=12, **TINY))
    assert load_calibration(f"{out}/calibration_gold")[0] == load_calibration(f"{out}/calibration")[0]
    gold = train_ctrl(CTRLConfig(out_dir=out, name="gold", reward="gold", **RL, **TINY))[1]
    assert all(gold[f"{key}_r"] == gold[f"{key}_gold"] for key in ("win_rate", "bon4", "won4"))
    experiments.main(["tilt", f"--out_dir={out}", "--n_eval=1", "--k=4", "--support_draws=6", "--policy_samples=4", "--ctrl=gold", "--device=cpu"])
    assert "trained on gold, against its exact optima (selected by gold;" in open(f"{out}/tilt_trained.md").read()


def test_a_per_prompt_scale_of_r_leaves_calibrated_ctrl_unchanged_and_moves_raw(tmp_path):
    """InfAlign's reason to calibrate: with r times a per-prompt scale, CTRL on C_hat trains exactly the
    same policy (C_hat keeps each prompt's order), raw RLHF another one."""
    out = str(tmp_path)
    tiny_sft_and_reward(out)
    for reward in ("model", "scaled"):
        run_calibration(CalibrateConfig(out_dir=out, reward=reward, n_prompts=6, k=4, max_new_tokens=12, **TINY))
    prompts, plain = load_calibration(f"{out}/calibration")
    scales = prompt_scale(prompts)
    assert torch.allclose(load_calibration(f"{out}/calibration_scaled")[1], plain * scales[:, None].float())
    rl = {**RL, "eval_prompts": 0}
    weights = {}
    for reward in ("model", "scaled"):
        for transform in ("identity", "raw"):
            train_ctrl(CTRLConfig(out_dir=out, name=f"{transform}_{reward}", reward=reward, transform=transform,
                                  beta=1.0, **rl, **TINY))
            weights[transform, reward] = load_model(f"{out}/{transform}_{reward}")[0].state_dict()
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(weights["identity", "model"], weights["identity", "scaled"])
    assert not same(weights["raw", "model"], weights["raw", "scaled"])
    assert load_meta(f"{out}/raw_scaled")["metrics"] == {}  # --eval_prompts 0: no final evaluation


def test_prompt_scales_are_log_normal_and_fixed_by_the_prompt():
    scales = prompt_scale([f"Human: question {i}?\nAssistant:" for i in range(4000)])
    assert abs(float(scales.log().mean())) < 0.05 and abs(float(scales.log().std()) - 1.0) < 0.05
    assert torch.equal(prompt_scale(["a", "b", "a"])[[0, 2]], prompt_scale(["a", "a"]))


def test_the_gold_reward_function_is_the_worlds_gold_reward():
    prompt = world.eval_prompts(1, 0)[0].text
    replies = ["Happy to help. It is green.", "I can't help with that.", "zzz"]
    assert reward_function("gold", "unused", "cpu", None)([prompt] * 3, replies).tolist() == pytest.approx(
        [world.gold_reward(prompt, y) for y in replies])
    with pytest.raises(ConfigError, match="--reward gold grades the world's prompts only"):
        reward_function("gold", "unused", "cpu", None)(["Human: not a world question\nAssistant:"], ["x"])


def test_infalign_study_trains_each_transform_at_two_betas_and_resumes(tmp_path, monkeypatch):
    out = str(tmp_path)
    tiny_sft_and_reward(out)
    monkeypatch.setattr(infalign_study, "COMPARED", (("raw, scaled", 0.0), ("exp", -4.0)))
    flags = ["infalign", f"--out_dir={out}", "--infalign_prompts=3", "--ctrl_steps=1", "--seeds=2", "--calibration_k=4",
             "--support_draws=6", "--policy_samples=4", "--device=cpu"]
    experiments.main(flags)
    rows = list(csv.DictReader(open(f"{out}/infalign.csv")))
    assert len(rows) == 2 * 2 * 2  # transforms x grid KLs x seeds
    table = open(f"{out}/infalign.md").read()
    assert "| raw, scaled |" in table and "| exp(-4) |" in table
    # each beta was solved on the support: two betas per transform, the larger KL's the smaller beta
    betas = {(r["transform"], float(r["grid_kl"])): float(r["beta"]) for r in rows}
    assert betas["raw, scaled", 0.2] > betas["raw, scaled", 0.5] and betas["exp(-4)", 0.2] > betas["exp(-4)", 0.5]
    assert load_meta(f"{out}/infalign/raw_scaled_kl0.2_s1")["config"]["reward"] == "scaled"
    for calibration in ("calibration", "calibration_scaled"):
        assert len(load_calibration(f"{out}/infalign/{calibration}")[0]) == 3
    # a second run finds every run finished, on any device: nothing is trained, and the table is the same
    monkeypatch.setattr(infalign_study, "train_ctrl", lambda cfg: pytest.fail(f"{cfg.name} trained again"))
    monkeypatch.setattr(infalign_study, "run_calibration", lambda cfg: pytest.fail("calibrated again"))
    experiments.main(flags[:-1] + ["--device=auto"])
    assert list(csv.DictReader(open(f"{out}/infalign.csv"))) == rows


def test_infalign_study_on_the_gold_reward_trains_picks_and_judges_by_gold(tmp_path, monkeypatch):
    out = str(tmp_path)
    tiny_sft_and_reward(out)
    monkeypatch.setattr(infalign_study, "COMPARED", (("raw, scaled", 0.0), ("identity", 0.0)))
    experiments.main(["infalign", f"--out_dir={out}", "--reward=gold", "--infalign_prompts=3", "--ctrl_steps=1",
                      "--seeds=1", "--calibration_k=4", "--support_draws=6", "--policy_samples=4", "--device=cpu"])
    rows = list(csv.DictReader(open(f"{out}/infalign_gold.csv")))
    assert [(r["transform"], r["grid_kl"]) for r in rows] == [("identity", "0.2"), ("identity", "0.5")]  # no "raw, scaled"
    assert load_meta(f"{out}/infalign/gold_identity_kl0.5_s0")["config"]["reward"] == "gold"
    assert len(load_calibration(f"{out}/infalign/calibration_gold")[0]) == 3
    assert not os.path.exists(f"{out}/infalign/calibration") and not os.path.exists(f"{out}/infalign.md")
    table = open(f"{out}/infalign_gold.md").read()
    assert "trained on and picked by gold" in table and "| BoN_4 (gold) | gap |" in table


def test_won_levers_retrains_the_studys_run_one_lever_at_a_time_and_resumes(tmp_path, monkeypatch):
    out = str(tmp_path)
    tiny_sft_and_reward(out)
    flags = ["won-levers", f"--out_dir={out}", "--infalign_prompts=3", "--ctrl_steps=1", "--calibration_k=4",
             "--support_draws=6", "--policy_samples=4", "--device=cpu"]
    experiments.main(flags)
    table = open(f"{out}/won_levers.md").read()
    assert [f"| {label} |" in table for _, label, _ in won_levers.LEVERS] == [True] * len(won_levers.LEVERS)
    study, four = load_meta(f"{out}/infalign/exp-4_kl0.5_s0")["config"], load_meta(f"{out}/infalign/won_steps4")["config"]
    assert (four["steps"], four["beta"], four["t"]) == (4, study["beta"], -4.0)  # the study's run, 4x its steps
    assert "| G = 32, lr 2e-4 | 32 |" in table  # samples per prompt: steps x G
    # a second run trains and evaluates nothing again; the gold study's runs are not its subject
    monkeypatch.setattr(ctrl_levers, "trained_against_optimum", None)
    monkeypatch.setattr(ctrl_levers, "train_ctrl", None)
    monkeypatch.setattr(won_levers, "trained_against_optimum", None)
    experiments.main(flags)
    assert open(f"{out}/won_levers.md").read() == table
    with pytest.raises(ConfigError, match="drop --reward"):
        experiments.main(flags + ["--reward=gold"])


def test_paper_gain_trained_trains_each_ns_transforms_reusing_raw_and_log_and_resumes(tmp_path, monkeypatch):
    """For N = 2 and 4: exp(+t_N), exp(-t_N) with t_N by the 1-D tool at KL 0.35 (N = 2: +4 and -3,
    N = 4: +11 and -8), raw and log, at the study's two betas; raw and log are trained once for both N."""
    out = str(tmp_path)
    tiny_sft_and_reward(out)
    monkeypatch.setattr(paper_gain_trained, "NS", (2, 4))
    trained, train = [], infalign_study.train_ctrl
    monkeypatch.setattr(infalign_study, "train_ctrl", lambda cfg: (trained.append(cfg.name), train(cfg))[1])
    flags = ["paper-gain-trained", f"--out_dir={out}", "--infalign_prompts=3", "--ctrl_steps=1", "--seeds=1",
             "--calibration_k=4", "--support_draws=6", "--policy_samples=4", "--device=cpu"]
    experiments.main(flags)
    assert sorted(trained) == sorted(f"{name}_kl{kl}_s0" for name in ("raw", "log", "exp+4", "exp-3", "exp+11", "exp-8")
                                     for kl in ("0.2", "0.5"))
    table = open(f"{out}/paper_gain_trained.md").read()
    for row in ("| best-of-N | 2 | +4 |", "| worst-of-N | 2 | -3 |", "| best-of-N | 4 | +11 |", "| worst-of-N | 4 | -8 |"):
        assert row in table
    assert table.count("| 4 | exp(-8) | 0.") == 2 and table.count("| 2 | raw | 0.") == 2  # each run, both betas
    # a second run trains nothing: the table is the same up to its wall time
    monkeypatch.setattr(infalign_study, "train_ctrl", lambda cfg: pytest.fail(f"{cfg.name} trained again"))
    experiments.main(flags)
    wall = lambda text: text[: text.index("Wall time")]  # noqa: E731
    assert wall(open(f"{out}/paper_gain_trained.md").read()) == wall(table)


def test_matched_kl_adds_each_seeds_interpolated_gap_to_the_optimum_and_averages_every_seed(monkeypatch):
    """Hand-computed: per seed the line through its two (KL, gap) points, gap = trained - optimum at the KL
    reached, read at KL 0.35: seed 0 (0.2, -0.10), (0.5, -0.04) -> -0.07; seed 1 (0.3, -0.02), (0.4, -0.04)
    -> -0.03; seed 2 (0.1, -0.20), (0.3, -0.10) -> -0.075 (extrapolated: a gap is kept whatever side it
    lands on). Each rate: the optimum's at 0.35 (0.8) plus the mean gap, ± SE of the gaps across seeds."""
    monkeypatch.setattr(infalign_study, "COMPARED", (("raw", 0.0),))
    points = {0: ((0.2, -0.10), (0.5, -0.04)), 1: ((0.3, -0.02), (0.4, -0.04)), 2: ((0.1, -0.20), (0.3, -0.10))}
    columns = [f"{k}_{j}" for k in infalign_study.RATES for j in infalign_study.JUDGES]
    trained = [{"transform": "raw", "seed": s, "kl": kl, **dict.fromkeys(columns, 0.6 + gap),
                **{f"{c}_at_kl": 0.6 for c in columns}} for s, pts in points.items() for kl, gap in pts]
    optima = {"raw": dict.fromkeys(columns, 0.8)}
    (raw,) = infalign_study.matched_rows(trained, optima, [0, 1, 2])
    gaps = torch.tensor([-0.07, -0.03, -0.075], dtype=torch.float64)
    assert raw["bon_r"] == pytest.approx(0.8 + float(gaps.mean()))
    assert raw["bon_r_se"] == pytest.approx(float(gaps.std() / 3 ** 0.5)) and raw["won_gold_optimum"] == 0.8
    table = infalign_study.markdown([raw], [], [], 4, 3, 12, 1.0)
    assert f"| raw | {0.8 + float(gaps.mean()):.3f} ± {float(gaps.std() / 3 ** 0.5):.3f} (0.800) |" in table
    assert infalign_study.interpolate([0.5, 0.2], [0.9, 0.6], 0.35) == pytest.approx(0.75)  # either order


def test_gains_pair_the_transforms_per_prompt_at_matched_kl(monkeypatch):
    """Hand-computed, two prompts: each transform's per-prompt gaps read at KL 0.35 on each seed's line and
    averaged over the seeds, exp(+4): seed 0 (0.2, [-.10, -.02]), (0.5, [-.04, -.08]) -> [-.07, -.05];
    seed 1 (0.3, [0, -.02]), (0.4, [-.04, 0]) -> [-.02, -.01]; mean [-.045, -.03]. raw: seed 0 (0.25, [0, 0]),
    (0.45, [-.02, -.04]) -> [-.01, -.02]; seed 1 (0.35, [-.03, .03]), (0.55, [.05, .05]) -> [-.03, .03];
    mean [-.02, .005]. Gain per prompt: the optima's 0.85 - 0.72 plus the gaps' difference, [.105, .095]:
    0.100 ± 0.005 (the SE of the two differences; unpaired, the prompts' spread would enter it)."""
    monkeypatch.setattr(infalign_study, "GAINS", (("bon", "exp(+4)", "raw"), ("won", "exp(-4)", "raw")))
    columns = [f"{k}_{j}" for k in infalign_study.RATES for j in infalign_study.JUDGES]
    points = {("exp(+4)", 0): ((0.2, [-.10, -.02]), (0.5, [-.04, -.08])), ("exp(+4)", 1): ((0.3, [0, -.02]), (0.4, [-.04, 0])),
              ("raw", 0): ((0.25, [0, 0]), (0.45, [-.02, -.04])), ("raw", 1): ((0.35, [-.03, .03]), (0.55, [.05, .05]))}
    trained, gaps = [], {}
    for (label, seed), pts in points.items():
        for grid_kl, (kl, gap) in zip((0.2, 0.5), pts):
            trained.append({"transform": label, "seed": seed, "grid_kl": grid_kl, "kl": kl})
            gaps[(label, grid_kl, seed)] = dict.fromkeys(columns, torch.tensor(gap, dtype=torch.float64))
    optima = {"exp(+4)": dict.fromkeys(columns, 0.85), "raw": dict.fromkeys(columns, 0.72)}
    (row,) = infalign_study.gain_rows(trained, gaps, optima, [0, 1])  # exp(-4) was not compared: left out
    assert (row["transform"], row["baseline"], row["bon_gold_optimum"]) == ("exp(+4)", "raw", pytest.approx(0.13))
    assert row["bon_r"] == pytest.approx(0.100) and row["bon_r_se"] == pytest.approx(0.005)
    table = infalign_study.markdown([], [row], [], 4, 2, 2, 1.0)
    assert "| BoN_4 | exp(+4) - raw | +0.100 ± 0.005 | +0.130 | +0.100 ± 0.005 | +0.130 |" in table


def test_distance_rows_average_each_seeds_gap_to_the_optimum_at_its_kl():
    """Hand-computed: two seeds of one (transform, beta); gap = trained - optimum at the KL it reached."""
    columns = [f"{k}_{j}" for k in infalign_study.RATES for j in infalign_study.JUDGES]
    columns += ["kl_benign", "kl_harmful", "kl_attacked", "bottom", "bottom_worst"]
    runs = [{"transform": "log", "grid_kl": 0.2, "beta": 0.9, "seed": s, "kl": kl, **dict.fromkeys(columns, v),
             **{f"{c}_at_kl": opt for c in columns}} for s, kl, v, opt in ((0, 0.1, 0.70, 0.75), (1, 0.3, 0.80, 0.81))]
    row = infalign_study.distance_rows(runs)[0]
    assert (row["seeds"], row["kl"], row["bon_r"]) == (2, pytest.approx(0.2), pytest.approx(0.75))
    assert row["won_gold_gap"] == pytest.approx(-0.03) and row["won_gold_gap_se"] == pytest.approx(0.02)
    assert row["kl_se"] == pytest.approx(0.1)
    assert row["kl_harmful"] == pytest.approx(0.75) and row["kl_harmful_at_kl"] == pytest.approx(0.78)
    assert row["bottom_worst"] == pytest.approx(0.75) and row["bottom_at_kl"] == pytest.approx(0.78)


def test_the_warm_start_fits_the_optimum_log_ratio_and_the_levers_table_runs(tmp_path, monkeypatch):
    out = str(tmp_path)
    tiny_sft_and_reward(out)
    run_calibration(CalibrateConfig(out_dir=out, n_prompts=6, k=4, max_new_tokens=12, **TINY))
    train_ctrl(CTRLConfig(out_dir=out, name="warm", warm_samples=4, warm_epochs=6, lr=1e-3, micro_batch=8,
                          **{**RL, "steps": 1, "eval_prompts": 0}, **TINY))
    fit = [json.loads(line) for line in open(f"{out}/logs/warm.jsonl")][0]
    assert fit["step"] == 0 and fit["warm_mse_last"] < 0.5 * fit["warm_mse_first"]  # least squares that descends
    experiments.main(["ctrl-levers", f"--out_dir={out}", "--n_eval=1", "--support_draws=6", "--policy_samples=4", "--ctrl_steps=1"])
    table = open(f"{out}/ctrl_levers.md").read()
    assert [label in table for _, label, _ in ctrl_levers.LEVERS] == [True] * len(ctrl_levers.LEVERS)
    # a second run trains and evaluates nothing again, also for a run saved before a flag was added
    monkeypatch.setattr(ctrl_levers, "trained_against_optimum", None)
    monkeypatch.setattr(ctrl_levers, "train_ctrl", None)
    meta = json.load(open(f"{out}/levers_default/config.json"))
    del meta["config"]["lr_decay"]
    json.dump(meta, open(f"{out}/levers_default/config.json", "w"))
    with open(f"{out}/logs/levers_default.jsonl", "a") as log:  # and a later run stopped before its first step
        log.write(json.dumps({"time": 1e6, "step": 0}) + "\n")
    experiments.main(["ctrl-levers", f"--out_dir={out}", "--n_eval=1", "--support_draws=6", "--policy_samples=4", "--ctrl_steps=1"])
    assert open(f"{out}/ctrl_levers.md").read() == table  # the training seconds too, from each run's log


def test_lr_decay_follows_the_cosine_to_a_tenth_and_fixes_the_steps_of_a_resume(tmp_path, monkeypatch):
    """``--lr_decay``: step s of S trains at lr (0.1 + 0.9 (1 + cos(pi s / S)) / 2), hand-computed for S = 4;
    a resumed run cannot change --steps, which would bend the schedule it was on."""
    import minialign.ctrl as ctrl
    out = str(tmp_path)
    tiny_sft_and_reward(out)
    run_calibration(CalibrateConfig(out_dir=out, n_prompts=6, k=4, max_new_tokens=12, **TINY))
    seen, step = [], ctrl.ctrl_step
    monkeypatch.setattr(ctrl, "ctrl_step", lambda ddp, policy, reference, run, *rest: (
        seen.append(run.optimizer.param_groups[0]["lr"]), step(ddp, policy, reference, run, *rest))[1])
    cfg = CTRLConfig(out_dir=out, name="decay", lr=1e-3, lr_decay=True, **{**RL, "eval_prompts": 0}, **TINY)
    train_ctrl(cfg)
    assert seen == pytest.approx([1e-3, 0.868198e-3, 0.55e-3, 0.231802e-3], rel=1e-5)
    with pytest.raises(ConfigError, match="--steps is 8"):
        train_ctrl(CTRLConfig(**{**vars(cfg), "steps": 8, "resume": True}))
