"""The method as pure functions, checked against values computed by hand."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from objectives import dreambooth_loss, min_snr_weights, noise_target, sample_noise


def scheduler(prediction_type):
    # Two timesteps with betas chosen so that alpha_bar = [0.64, 0.36]: sqrt values 0.8/0.6 and 0.6/0.8.
    return DDPMScheduler(num_train_timesteps=2, trained_betas=[0.36, 0.4375], prediction_type=prediction_type)


def test_epsilon_target_is_the_noise():
    noise = torch.randn(2, 4, 3, 3)
    assert torch.equal(noise_target(scheduler("epsilon"), torch.randn(2, 4, 3, 3), noise, torch.tensor([0, 1])), noise)


def test_v_prediction_target_by_hand():
    # v = sqrt(a) * eps - sqrt(1 - a) * x0; x0 = 1, eps = 2: t=0 -> 0.8*2 - 0.6*1 = 1.0; t=1 -> 0.6*2 - 0.8*1 = 0.4
    x0, eps = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    v = noise_target(scheduler("v_prediction"), x0, eps, torch.tensor([0, 1]))
    assert torch.allclose(v[0], torch.full((1, 2, 2), 1.0), atol=1e-6)
    assert torch.allclose(v[1], torch.full((1, 2, 2), 0.4), atol=1e-6)


def test_unknown_prediction_type_is_refused():
    s = scheduler("epsilon")
    s.register_to_config(prediction_type="sample")
    with pytest.raises(ValueError, match="sample"):
        noise_target(s, torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([0]))


def test_snr_of_the_schedule_by_hand():
    # SNR = a / (1 - a): 0.64 / 0.36 = 16/9 and 0.36 / 0.64 = 9/16
    snr = compute_snr(scheduler("epsilon"), torch.tensor([0, 1]))
    assert torch.allclose(snr, torch.tensor([16 / 9, 9 / 16]))


def test_min_snr_weights_by_hand():
    snr = torch.tensor([1.0, 4.0, 9.0])
    # epsilon: min(snr, 5) / snr = [1, 1, 5/9]; v: min(snr, 5) / (snr + 1) = [1/2, 4/5, 5/10]
    assert torch.allclose(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 5 / 9]))
    assert torch.allclose(min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5, 0.8, 0.5]))


def batch_of(values):
    """(N, 1, 1, 2) targets whose per-example MSE against zeros is value**2."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 1, 2).contiguous()


def test_prior_preservation_loss_split_by_hand():
    # instances first (targets 1 and 3 -> mse 1 and 9, mean 5), then class images (2 and 0 -> 4 and 0, mean 2)
    target = batch_of([1, 3, 2, 0])
    loss, instance_loss, prior_loss = dreambooth_loss(torch.zeros_like(target), target, 2, 0.5)
    assert instance_loss.item() == 5.0 and prior_loss.item() == 2.0
    assert loss.item() == 5.0 + 0.5 * 2.0


def test_loss_weights_apply_per_example():
    target = batch_of([1, 3, 2, 0])
    weights = torch.tensor([1.0, 0.0, 0.5, 1.0])
    loss, instance_loss, prior_loss = dreambooth_loss(torch.zeros_like(target), target, 2, 1.0, weights)
    assert instance_loss.item() == 0.5 and prior_loss.item() == 1.0 and loss.item() == 1.5


def test_loss_without_class_examples():
    target = batch_of([1, 2])
    loss, instance_loss, prior_loss = dreambooth_loss(torch.zeros_like(target), target, 2, 1.0)
    assert prior_loss.item() == 0.0 and loss.item() == instance_loss.item() == 2.5


def test_loss_is_computed_in_fp32_for_half_inputs():
    target = batch_of([300, 0]).half()  # 300**2 overflows fp16's max of 65504
    loss, _, _ = dreambooth_loss(torch.zeros_like(target), target, 2, 1.0)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())


def test_offset_noise_adds_a_per_channel_constant():
    latents = torch.zeros(2, 4, 8, 8)
    torch.manual_seed(0)
    plain = sample_noise(latents, offset_noise=False)
    torch.manual_seed(0)
    offset = sample_noise(latents, offset_noise=True)
    delta = offset - plain
    assert not torch.equal(delta, torch.zeros_like(delta))
    assert torch.allclose(delta, delta[:, :, :1, :1].expand_as(delta), atol=1e-6)  # constant over each channel's pixels


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_ddpm_objectives_draw_by_hand(prediction_type):
    """The objective's draw on the two-step schedule (alpha_bar 0.64, 0.36): the noise and then a timestep per
    example from the random state, x_t = sqrt(a) x0 + sqrt(1 - a) eps, the target eps or v, Min-SNR weights."""
    from objectives import DDPM

    x0 = torch.linspace(-1, 1, 2 * 4 * 3 * 3).reshape(2, 4, 3, 3)
    torch.manual_seed(7)
    draw = DDPM(scheduler(prediction_type), snr_gamma=1.0).draw(x0)
    torch.manual_seed(7)
    eps, t = torch.randn_like(x0), torch.randint(0, 2, (2,))
    root_a = torch.tensor([0.8, 0.6])[t].view(2, 1, 1, 1)
    root_1ma = torch.tensor([0.6, 0.8])[t].view(2, 1, 1, 1)
    assert torch.equal(draw.timesteps, t)
    assert torch.allclose(draw.noisy_latents, root_a * x0 + root_1ma * eps, atol=1e-6)
    assert torch.allclose(draw.target, eps if prediction_type == "epsilon" else root_a * eps - root_1ma * x0, atol=1e-6)
    snr = torch.tensor([16 / 9, 9 / 16])[t]  # min(snr, 1) / snr for epsilon, / (snr + 1) for v
    expected = torch.clamp(snr, max=1.0) / (snr if prediction_type == "epsilon" else snr + 1)
    assert torch.allclose(draw.weights, expected)


def test_the_ddpm_objective_without_min_snr_weighs_nothing():
    from objectives import DDPM

    assert DDPM(scheduler("epsilon")).draw(torch.zeros(2, 1, 2, 2)).weights is None
