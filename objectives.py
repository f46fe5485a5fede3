"""What the model is trained to predict, and the loss: pure functions of tensors (the noise target for epsilon and
v-prediction, Min-SNR weights, offset noise, the flow-matching noise levels, the instance/prior loss split, the
masked loss), unit-tested against hand-computed values; and the two objectives, DDPM and flow matching."""

from typing import NamedTuple

import torch
import torch.nn.functional as F


PREDICTION_TYPES = ("epsilon", "v_prediction")


def noise_target(scheduler, latents, noise, timesteps):
    """What the UNet learns to predict: the noise (epsilon) or the velocity v = sqrt(a_t) eps - sqrt(1 - a_t) x0
    (Salimans & Ho 2022; SD 2.x 768 px models use v). It must follow the model's own scheduler config."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def min_snr_weights(snr, gamma, prediction_type):
    """Per-example loss weights of Min-SNR-gamma (Hang et al. 2023, arxiv 2303.09556): min(SNR, gamma) / SNR for an
    epsilon target; a v target already carries a factor SNR + 1, so divide by that instead."""
    weights = torch.clamp(snr, max=gamma)
    return weights / (snr + 1) if prediction_type == "v_prediction" else weights / snr


LOSSES = ("loss", "instance_loss", "prior_loss")  # what dreambooth_loss returns, in its order


def dreambooth_loss(model_pred, target, num_instance, prior_loss_weight, weights=None, pixel_weights=None):
    """Instance loss + prior_loss_weight * prior loss (the paper's eq. 2). The batch holds the instance examples first
    and the class examples after them. `weights`: one per example (min-SNR); `pixel_weights`: one per latent pixel
    (masks), each example's squared error averaged with them, so an all-ones weight is the plain mean. Returns (loss,
    instance_loss, prior_loss); the prior loss is 0 without class examples."""
    error = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    dims = tuple(range(1, target.ndim))
    if pixel_weights is None:
        per_example = error.mean(dim=dims)
    else:
        per_example = (error * pixel_weights).mean(dim=dims) / pixel_weights.mean(dim=dims).clamp_min(1e-8)
    if weights is not None:
        per_example = per_example * weights
    instance_loss = per_example[:num_instance].mean()
    prior_loss = per_example[num_instance:].mean() if len(per_example) > num_instance else per_example.new_zeros(())
    return instance_loss + prior_loss_weight * prior_loss, instance_loss, prior_loss


def mask_weights(masks, size, background_weight):
    """Masks (N, 1, H, W) in [0, 1] at pixel size, white = subject, as per-pixel loss weights at latent `size`: each
    latent pixel the subject's share of its patch (area average), the background at `background_weight`. White is
    exactly 1 whatever the background weight, so an all-white mask is the plain loss."""
    return 1 - (1 - background_weight) * (1 - F.interpolate(masks, size=tuple(size), mode="area"))


def sample_noise(latents, offset_noise=False):
    """Gaussian noise like the latents; with offset noise, plus 0.1 x a per-channel constant, which lets the model
    learn to change an image's mean brightness (crosslabs.org/blog/diffusion-with-offset-noise)."""
    noise = torch.randn_like(latents)
    if offset_noise:
        noise = noise + 0.1 * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device, dtype=latents.dtype)
    return noise


# ----------------------------------------------------------------------------------------------------------------
# The objectives: chosen once from the model's scheduler config, before the loop; the step calls draw() and the
# loss without knowing which


class Draw(NamedTuple):
    """One training draw for a batch of clean latents: the denoiser's input, its timesteps, what it should predict,
    per-example loss weights (None: all 1), and with SD3's preconditioning the sigmas that turn the denoiser's output
    into a prediction of the clean latents (prediction())."""
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None
    precondition: torch.Tensor | None = None

    def prediction(self, output):
        """What the loss compares with the target: the denoiser's output, or with preconditioning (EDM, Karras et al.
        2022, as diffusers' SD3 scripts) the clean latents it implies, x_t - sigma v."""
        return output if self.precondition is None else output * -self.precondition + self.noisy_latents


class DDPM:
    """The denoising objective of DDPM (Ho et al. 2020) on the model's own noise schedule, read as DDPMScheduler
    (same betas, same prediction type): a uniform timestep per example, x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, the
    noise or the velocity as the target, optional Min-SNR weights and offset noise."""

    def __init__(self, scheduler, snr_gamma=None, offset_noise=False):
        self.scheduler, self.snr_gamma, self.offset_noise = scheduler, snr_gamma, offset_noise
        self.prediction_type = scheduler.config.prediction_type

    def draw(self, latents):
        # important! the noise first, then the timesteps: the order of the random draws is part of exact resume
        noise = sample_noise(latents, self.offset_noise)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=latents.device).long()
        weights = None
        if self.snr_gamma:
            from diffusers.training_utils import compute_snr

            weights = min_snr_weights(compute_snr(self.scheduler, timesteps), self.snr_gamma, self.prediction_type)
        return Draw(self.scheduler.add_noise(latents, noise, timesteps), timesteps,
                    noise_target(self.scheduler, latents, noise, timesteps), weights)


WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")


def flow_sigmas(scheduler, u, image_tokens):
    """Noise levels for draws u in [0, 1): diffusers' discretisation (u picks one of the scheduler's training
    timesteps, u = 0 the noisiest), with the scheduler's shift: a fixed one is already in its timesteps (SD 3.5:
    3.0); a resolution-dependent one (FLUX.1: use_dynamic_shifting) is applied here for the image's token count, as
    FluxPipeline samples (diffusers' FLUX scripts leave it out and train on unshifted sigmas)."""
    config = scheduler.config
    indices = (u * config.num_train_timesteps).long()
    sigmas = scheduler.sigmas[indices].float()
    if config.use_dynamic_shifting:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(image_tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                             config.max_shift)
        sigmas = scheduler.time_shift(mu, 1.0, sigmas)
    return sigmas


class Flow:
    """Rectified flow (Liu et al. 2022; Esser et al. 2024, the SD3 paper): x_t = (1 - sigma) x_0 + sigma noise, the
    target the velocity noise - x_0, sigma drawn with --weighting_scheme's density (logit-normal, mode) or uniformly,
    the loss weighted by sigma_sqrt or cosmap, all through diffusers' training_utils; the timestep the denoiser sees
    is 1000 sigma. Offset noise keeps its meaning: the noise drawn with a per-channel offset."""
    prediction_type = "flow"

    def __init__(self, scheduler, weighting_scheme="none", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                 precondition_outputs=False, offset_noise=False, patch_size=2):
        self.scheduler, self.weighting_scheme, self.offset_noise = scheduler, weighting_scheme, offset_noise
        self.density = dict(logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)
        self.precondition_outputs, self.patch_size = precondition_outputs, patch_size

    def draw(self, latents):
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        # important! the noise first, then the timesteps: the order of the random draws is part of exact resume
        noise = sample_noise(latents, self.offset_noise)
        u = compute_density_for_timestep_sampling(self.weighting_scheme, latents.shape[0], **self.density)
        image_tokens = latents.shape[-2] * latents.shape[-1] // self.patch_size ** 2
        sigmas = flow_sigmas(self.scheduler, u, image_tokens).to(latents.device)
        s = sigmas.view(-1, *[1] * (latents.ndim - 1))
        weights = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas)
        return Draw((1 - s) * latents + s * noise, sigmas * self.scheduler.config.num_train_timesteps,
                    latents if self.precondition_outputs else noise - latents,
                    None if self.weighting_scheme not in ("sigma_sqrt", "cosmap") else weights,
                    s if self.precondition_outputs else None)


def load(name_or_path, family, revision=None, snr_gamma=None, offset_noise=False, flow=None):
    """The objective of a model, named by its family's row and built on its own scheduler config: DDPM (the noise
    schedule read as DDPMScheduler) or flow matching (FlowMatchEulerDiscreteScheduler, with its shift). `flow`: the
    flow settings (weighting_scheme, logit_mean, logit_std, mode_scale, precondition_outputs)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    import cli
    import loading

    if family.objective == "flow":
        scheduler = loading.from_pretrained(FlowMatchEulerDiscreteScheduler, name_or_path, subfolder="scheduler",
                                             revision=revision)
        return Flow(scheduler, offset_noise=offset_noise, **flow)
    scheduler = loading.from_pretrained(DDPMScheduler, name_or_path, subfolder="scheduler", revision=revision)
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        cli.fail(f"the model's scheduler predicts {scheduler.config.prediction_type!r}; supported: {PREDICTION_TYPES}")
    return DDPM(scheduler, snr_gamma, offset_noise)
