"""Calibration: C_hat in [0, 1], mean exactly 1/2 under pi_ref, invariant to increasing transforms, ties half."""
import pytest
import torch

from minialign.calibrated_reward import calibrated


def test_values_in_unit_interval_and_mean_half_on_reference_samples():
    torch.manual_seed(0)
    ref = torch.randn(7, 50).round(decimals=1)  # rounding makes ties
    c = calibrated(ref.sort(1).values, ref)
    assert c.min() >= 0 and c.max() <= 1
    torch.testing.assert_close(c.mean(1), torch.full((7,), 0.5, dtype=c.dtype))  # exactly 1/2, ties included


def test_invariant_to_a_different_increasing_transform_per_prompt():
    torch.manual_seed(1)
    ref, new = torch.randn(3, 40), torch.randn(3, 25)
    transforms = [lambda r: r * 3 + 10, torch.exp, lambda r: r ** 3 - 5]
    tref = torch.stack([f(r) for f, r in zip(transforms, ref)])
    tnew = torch.stack([f(r) for f, r in zip(transforms, new)])
    assert torch.equal(calibrated(ref.sort(1).values, new), calibrated(tref.sort(1).values, tnew))


def test_ties_count_half_by_hand():
    ref = torch.tensor([[1.0, 2.0, 2.0, 3.0]])
    c = calibrated(ref, torch.tensor([[2.0, 0.0, 5.0, 2.5]]))
    assert c.tolist() == [[(1 + 0.5 * 2) / 4, 0.0, 1.0, 3 / 4]]


def test_smoothed_is_never_zero_or_one():
    ref = torch.tensor([[1.0, 2.0, 3.0]])
    c = calibrated(ref, torch.tensor([[-9.0, 9.0]]), smoothed=True)
    assert c.tolist() == [[0.5 / 4, 3.5 / 4]]


def test_uniform_under_reference_without_ties():
    # on its own K tie-free samples C_hat takes each value (k + 1/2) / K exactly once: a uniform grid
    torch.manual_seed(2)
    ref = torch.randn(3, 64)
    c = calibrated(ref.sort(1).values, ref).sort(1).values
    torch.testing.assert_close(c, ((torch.arange(64) + 0.5) / 64).expand(3, -1))


@pytest.mark.parametrize("rewards_file", [b"not a tensor file", "pickle", "mismatch"])
def test_a_broken_calibration_is_one_sentence(tmp_path, rewards_file):
    import json
    import pickle

    from minialign.calibrate import load_calibration
    from minialign.checkpoint import CheckpointError
    folder = tmp_path / "calibration"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "prompts.json").write_text(json.dumps(["a", "b"]))
    if rewards_file == "pickle":
        (folder / "rewards.pt").write_bytes(pickle.dumps(object(), protocol=2))  # weights_only refuses it
    elif rewards_file == "mismatch":
        torch.save(torch.zeros(3, 4), folder / "rewards.pt")  # three rows for two prompts
    else:
        (folder / "rewards.pt").write_bytes(rewards_file)
    with pytest.raises(CheckpointError, match="calibrate --force"):
        load_calibration(str(folder))
