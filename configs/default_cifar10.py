"""Defaults shared by the CIFAR-10 configs: every field of the 2021 reference's
``configs/default_cifar10_configs.py``, plus ``training.sde``, ``sampling.method``,
``sampling.predictor``, ``sampling.corrector``, ``model.dtype``, ``model.num_classes`` and
``model.conv_impl`` so that each can be overridden on the command line (configs are locked
once loaded). Not a runnable config by itself: the per-model files
(``configs/cifar10_*.py``) build on it.

``model.centered`` is tied to ``data.centered`` through an ml_collections
``FieldReference``: setting either (``--config.data.centered=True``) sets both, so the
network's input scaling always matches the data pipeline.
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("small",)


def get_default_configs() -> ml_collections.ConfigDict:
    """The reference's CIFAR-10 defaults (batch 128, 1.3M iterations, Adam 2e-4)."""
    config = ml_collections.ConfigDict()

    config.training = training = ml_collections.ConfigDict()
    training.sde = "vpsde"  # 'vpsde' | 'subvpsde' | 'vesde'
    training.batch_size = 128
    training.n_iters = 1300001
    training.snapshot_freq = 50000
    training.log_freq = 50
    training.eval_freq = 100
    # Extra checkpoints to resume after preemption.
    training.snapshot_freq_for_preemption = 10000
    # Produce samples at each snapshot.
    training.snapshot_sampling = True
    training.likelihood_weighting = False
    training.label_dropout = 0.0  # > 0: drop class labels for classifier-free guidance
    training.continuous = True
    training.reduce_mean = False
    training.n_jitted_steps = 5

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.method = "pc"
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "langevin"
    sampling.n_steps_each = 1
    sampling.noise_removal = True
    sampling.probability_flow = False
    sampling.snr = 0.16
    sampling.eps = 1e-3  # last sampling time: 1e-3 for VP / sub-VP, 1e-5 for VE (the reference's)
    # The probability-flow ODE (ode sampling, likelihood) of a discretely trained VP model
    # uses the continuous adapter (label 999 t, marginal std), as the 2021 reference; False:
    # its discrete one (models.get_score_fn), piecewise constant in t.
    sampling.ode_continuous_score = True

    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.begin_ckpt = 9
    evaluate.end_ckpt = 26
    evaluate.batch_size = 1024
    evaluate.enable_sampling = False
    # FID / KID: Inception-v3 features; the weights file and the training split's
    # statistics are the user's (see diffusion_sde/inception.py and reference_stats.py).
    evaluate.feature_extractor = "inception_v3"
    evaluate.inception_weights = ""  # '' looks in ~/.cache/diffusion_sde
    evaluate.reference_stats = ""
    evaluate.num_samples = 50000
    # Samples are clipped to [0, 1] and quantised to 8 bits before the features: 'floor'
    # (the 2021 reference's astype(uint8)) or 'round' (EDM's).
    evaluate.quantization = "floor"
    evaluate.is_splits = 1  # Inception Score over all samples at once, as TF-GAN / the reference
    evaluate.enable_loss = True
    evaluate.enable_bpd = False
    evaluate.bpd_dataset = "test"
    evaluate.bpd_num_passes = 5  # passes with fresh dequantisation noise and probes

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "cifar10"
    data.image_size = 32
    data.random_flip = True
    data.centered = ml_collections.FieldReference(False)
    data.uniform_dequantization = False
    data.num_channels = 3

    config.model = model = ml_collections.ConfigDict()
    model.sigma_min = 0.01
    model.sigma_max = 50
    model.num_scales = 1000
    model.beta_min = 0.1
    model.beta_max = 20.0
    model.dropout = 0.1
    model.embedding_type = "fourier"
    model.ema_rate = 0.9999
    model.dtype = "float32"  # computation dtype: 'float32' | 'bfloat16'
    model.num_classes = 0  # > 0: class-conditional, label num_classes is the null label
    model.conv_impl = "auto"  # see convolution.CONV_IMPLS; auto: Winograd on CPU, XLA's otherwise
    # To load published checkpoints (diffusion_sde.pretrained): the Fourier frequencies as
    # the parameter W (True for score_sde's NCSN++), and where the DDPM decoder attends
    # ('every_block' as Ho et al. and diffusers, 'once_per_level' as score_sde's DDPM).
    model.fourier_in_params = False
    model.decoder_attention = "every_block"
    model.centered = data.get_ref("centered")

    config.optim = optim = ml_collections.ConfigDict()
    optim.weight_decay = 0
    optim.optimizer = "Adam"
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.warmup = 5000
    optim.grad_clip = 1.0

    config.seed = 42
    return config


def with_variant(config: ml_collections.ConfigDict, variant: str | None):
    """``config`` as given (``variant=None``) or shrunk to a laptop-CPU size (``'small'``).

    ``small`` keeps the dataset, SDE, loss and sampler and shrinks the rest: images
    resized to 16x16; the U-Nets to ``nf=32``, ``ch_mult=(1, 2)``, one residual block per
    level, attention at 8x8; NCSNv2 to ``nf=16``; batches of 16, one step per jitted call,
    frequent logs and snapshots, 64 evaluation samples. It trains at a few steps per
    second on a laptop CPU.
    """
    if variant is None:
        return config
    if variant not in VARIANTS:
        raise ValueError(f"Unknown config variant {variant!r}; valid: {list(VARIANTS)}")
    training = config.training
    training.batch_size = 16
    training.n_iters = 2001
    training.snapshot_freq = 1000
    training.snapshot_freq_for_preemption = 250
    training.log_freq = 10
    training.eval_freq = 50
    training.n_jitted_steps = 1
    config.eval.batch_size = 16
    config.eval.num_samples = 64
    config.eval.begin_ckpt = 1
    config.eval.end_ckpt = 2
    config.data.image_size = 16
    model = config.model
    if model.name == "ncsnv2":
        model.nf = 16
    else:
        model.nf = 32
        model.ch_mult = (1, 2)
        model.num_res_blocks = 1
        model.attn_resolutions = (8,)
    return config
