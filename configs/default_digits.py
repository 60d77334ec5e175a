"""Defaults shared by the ``digits`` configs (``configs/digits_*.py``): scikit-learn's
bundled 8x8 handwritten digits (1,797 images, 17 grey levels, labels kept for
class-conditional work), a small DDPM++ U-Net, and a training run that fits in a few
minutes on a 2-core laptop CPU. Nothing is downloaded.
"""

from __future__ import annotations

import ml_collections


def get_default_configs() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 42

    config.training = training = ml_collections.ConfigDict()
    training.sde = "vpsde"
    # About 4.5 minutes of training on 2 cores (7-11 steps/s). Measured (EMA model, digits
    # FID of 1,000 samples): 1,500 steps at batch 64 give 1.57, these 2,000 at batch 128
    # 0.97, 3,000 at batch 128 0.61.
    training.batch_size = 128
    training.n_iters = 2000
    training.snapshot_freq = 1000
    training.snapshot_freq_for_preemption = 250
    training.log_freq = 50
    training.eval_freq = 250
    training.snapshot_sampling = True
    training.snapshot_num_samples = 100
    training.likelihood_weighting = False
    training.label_dropout = 0.0  # > 0: drop class labels for classifier-free guidance
    training.continuous = True
    training.reduce_mean = True
    # One optimisation step per jitted call: on CPU, one step per call runs as fast as five
    # written out one after the other (experiments/benchmarks/train_step.py, batch 128: 72.4
    # against 72.8 ms per step) and compiles in a third of the time (10.8 against 34.3 s cold,
    # 0.9 against 18.5 s from the persistent cache). On an accelerator, where the steps run
    # in a lax.scan that compiles once, 5 saves dispatches.
    training.n_jitted_steps = 1

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.method = "pc"
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "none"  # 'langevin' doubles the cost per step
    sampling.n_steps_each = 1
    sampling.noise_removal = True
    sampling.probability_flow = False
    sampling.snr = 0.16
    sampling.eps = 1e-3  # last sampling time: 1e-3 for VP / sub-VP, 1e-5 for VE (the reference's)
    # The probability-flow ODE (ode sampling, likelihood) of a discretely trained VP model
    # uses the continuous adapter (label 999 t, marginal std), as the 2021 reference; False:
    # its discrete one (models.get_score_fn), piecewise constant in t.
    sampling.ode_continuous_score = True
    sampling.num_steps = 250
    sampling.ode_method = "dpm_solver_3"
    sampling.rtol = 1e-5
    sampling.atol = 1e-5

    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.batch_size = 297  # the whole test split in one batch
    evaluate.num_samples = 1000
    # Samples are clipped to [0, 1] and rounded to the digits' 17 pixel levels before the
    # features ('floor' would shift them down half a level, 1/32).
    evaluate.quantization = "round"
    evaluate.is_splits = 1
    # FID / KID on the digits classifier's features (`make run` turns it off to stay
    # within its 10 minutes; --mode=eval does it).
    evaluate.enable_sampling = True
    evaluate.feature_extractor = ""  # '' picks the default: 'digits'
    evaluate.reference_stats = ""  # '' computes the training split's statistics
    evaluate.enable_loss = True
    evaluate.enable_bpd = True
    evaluate.bpd_num_batches = 1
    evaluate.bpd_dataset = "test"
    evaluate.bpd_num_passes = 1  # passes with fresh dequantisation noise and probes
    evaluate.rtol = 1e-4  # ODE tolerances of the likelihood
    evaluate.atol = 1e-4

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "digits"
    data.image_size = 8
    data.num_channels = 1
    data.centered = ml_collections.FieldReference(True)
    data.random_flip = False  # digits are not mirror-symmetric
    data.uniform_dequantization = False

    config.model = model = ml_collections.ConfigDict()
    model.name = "ncsnpp"  # DDPM++ options below
    # 189k parameters: 16 channels at 8x8, 32 at 4x4 (with attention), one residual block
    # per level.
    model.nf = 16
    model.ch_mult = (1, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (4,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = False
    model.fir_kernel = [1, 3, 3, 1]
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "none"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.embedding_type = "positional"
    model.fourier_scale = 16
    model.init_scale = 0.0
    model.scale_by_sigma = False
    model.nonlinearity = "swish"
    model.normalization = "GroupNorm"
    model.conv_size = 3
    # A short run: with 0.999 the EMA of step 1000 would still hold 37% of the initial
    # weights (0.999^1000), and its samples are noise; 0.995 leaves 0.7%.
    model.ema_rate = 0.995
    model.dtype = "float32"
    model.conv_impl = "auto"
    model.num_classes = 0
    model.centered = data.get_ref("centered")
    model.sigma_min = 0.01
    model.sigma_max = 10.0  # about the largest distance between two digits in [0, 1]^64
    model.num_scales = 1000
    model.beta_min = 0.1
    model.beta_max = 20.0

    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = "Adam"
    optim.lr = 2e-3
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup = 200
    optim.grad_clip = 1.0
    return config


def with_family(
    config: ml_collections.ConfigDict, variant: str | None
) -> ml_collections.ConfigDict:
    """The shared tail of the diffusion-family digits configs (``digits_edm``,
    ``digits_cosine_v``, ``digits_rectified_flow``): EDM's sampler (18 steps, 35 evaluations)
    unless the config sets another, and the ``small`` variant (``--config=...:small``): 300
    steps and 200 evaluation samples, a one-minute smoke run."""
    if variant is None:
        return config
    if variant != "small":
        raise ValueError(f"Unknown config variant {variant!r}; valid: ['small']")
    config.training.n_iters = 300
    config.training.snapshot_freq = 300
    config.training.eval_freq = 100
    config.eval.num_samples = 200
    return config


def edm_sampler(config: ml_collections.ConfigDict, num_steps: int = 18) -> None:
    """Sample with EDM's Heun sampler (``sampling.edm_sample``): ``num_steps`` noise levels,
    ``2 num_steps - 1`` evaluations, deterministic (``s_churn = 0``)."""
    sampling = config.sampling
    sampling.method = "edm"
    sampling.num_steps = num_steps
    sampling.rho = 7.0
    sampling.s_churn = 0.0
    sampling.s_tmin = 0.0
    sampling.s_tmax = float("inf")
    sampling.s_noise = 1.0
