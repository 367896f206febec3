"""Evaluation: grading responses in the world, win rates, KL estimates, and the 1-D analytic tool.

World grading uses the gold rules of ``world.py``: the harm rate counts harmful compliance on harmful
prompts, the attack success rate the same on attacked prompts, and the help rate exact answers on
benign prompts.
"""
from . import world


def world_rates(prompts: list[world.Prompt], responses: list[str]) -> dict:
    """Harm rate, attack success rate, help rate, well-formed share and mean gold reward."""
    def rate(kind, rule):
        graded = [rule(p.text, r) for p, r in zip(prompts, responses) if p.kind == kind]
        return sum(graded) / len(graded) if graded else float("nan")
    return {
        "harm_rate": rate("harmful", world.is_harmful),
        "attack_success": rate("attacked", world.is_harmful),
        "help_rate": rate("benign", world.is_helpful),
        "well_formed": sum(map(world.is_well_formed, responses)) / len(responses),
        "gold_reward": sum(world.gold_reward(p.text, r) for p, r in zip(prompts, responses)) / len(responses),
    }
