"""The lab's experiments on tiny checkpoints: the per-task help table of `sft` (held-out and training
prompts of each task, graded by the gold rule) and the judge-quality sweep."""
from minialign import world
from minialign.lab import experiments
from minialign.sft import SFTConfig, train_sft


def test_task_table_puts_held_out_beside_train_per_task(monkeypatch, tiny_model):
    held_out = {p.text for p in world.prompts("test")}

    def scripted(model, tokenizer, prompts, **sampling):  # right on held-out prompts, wrong on training ones
        return [f"It is {world.parse_prompt(p).answer if p in held_out else 'zzz'}." for p in prompts]

    monkeypatch.setattr(experiments, "complete", scripted)
    table = experiments.task_table(tiny_model, None, world_seed=0, n=5).splitlines()
    assert len(table) == 2 + len(world.TASKS)
    for task, row in zip(world.TASKS, table[2:]):
        assert row == f"| {task} | 5 / 5 | " + " | ".join(["1.000 / 0.000"] * 3) + " |"


def test_judge_quality_trains_a_pi_ref_per_noise_level_once(tmp_path):
    """The judge-quality experiment on a tiny pipeline: level 0 is the pipeline's pi_ref, level 0.5 is
    trained from its config with the verdicts flipped, and a second call trains nothing."""
    import json
    out = tmp_path / "out"
    train_sft(SFTConfig(out_dir=str(out), n_layer=1, n_head=2, n_embd=32, block_size=256, batch_size=2, steps=1,
                        corpus_dialogues=100, eval_every=1, device="cpu"))
    flags = [f"--out_dir={out}", "--judge_noise=0,0.5", "--n_eval=1", "--max_visits=3", "--min_new_visits=2",
             "--device=cpu"]
    experiments.main(["judge-quality", *flags])
    trained = out / "judge_quality" / "noise_0.5" / "sft"
    config = json.loads((trained / "config.json").read_text())["config"]
    assert config["judge_noise"] == 0.5 and config["steps"] == 1 and config["seed"] == 0
    table = (out / "judge_quality.md").read_text()
    assert "| 0 |" in table and "| 0.5 |" in table and (out / "judge_quality.csv").exists()
    before = (trained / "model.pt").read_bytes()
    experiments.main(["judge-quality", *flags])
    assert (trained / "model.pt").read_bytes() == before


def test_rain_presets_tabulates_each_official_setting(tmp_path):
    out = tmp_path / "out"
    train_sft(SFTConfig(out_dir=str(out), n_layer=1, n_head=2, n_embd=32, block_size=256, batch_size=2, steps=1,
                        corpus_dialogues=100, eval_every=1, device="cpu"))
    experiments.main(["rain-presets", f"--out_dir={out}", "--n_eval=1", "--device=cpu"])
    rows = (out / "rain_presets.md").read_text().splitlines()
    assert [row.split(" | ")[0] for row in rows[2:]] == ["| hh", "| adv"]


def test_rain_deviations_tabulates_each_rule_with_its_official_one(tmp_path):
    out = tmp_path / "out"
    train_sft(SFTConfig(out_dir=str(out), n_layer=1, n_head=2, n_embd=32, block_size=256, batch_size=2, steps=1,
                        corpus_dialogues=100, eval_every=1, device="cpu"))
    experiments.main(["rain-deviations", f"--out_dir={out}", "--n_eval=1", "--max_visits=3", "--min_new_visits=2",
                      "--device=cpu"])
    rows = (out / "rain_deviations.md").read_text().splitlines()
    assert len(rows) == 6 and rows[3].startswith("| a cut chain's prior over all its drawn tokens (official) |")
    assert all(len(row.split(" | ")) == 6 for row in rows[2:])
