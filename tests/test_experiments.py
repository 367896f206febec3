"""The per-task help table of `experiments sft`: its columns are the held-out and the training prompts
of each task, graded by the gold rule."""
from minialign import world
from minialign.lab import experiments


def test_task_table_puts_held_out_beside_train_per_task(monkeypatch, tiny_model):
    held_out = {p.text for p in world.prompts("test")}

    def scripted(model, tokenizer, prompts, **sampling):  # right on held-out prompts, wrong on training ones
        return [f"It is {world.parse_prompt(p).answer if p in held_out else 'zzz'}." for p in prompts]

    monkeypatch.setattr(experiments, "complete", scripted)
    table = experiments.task_table(tiny_model, None, world_seed=0, n=5).splitlines()
    assert len(table) == 2 + len(world.TASKS)
    for task, row in zip(world.TASKS, table[2:]):
        assert row == f"| {task} | 5 / 5 | " + " | ".join(["1.000 / 0.000"] * 3) + " |"
