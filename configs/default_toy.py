"""Defaults shared by the 2-D toy configs (``configs/toy_2d_*.py``): an MLP score network
on a built-in 2-D distribution, trained in about a minute on a laptop CPU.

The dataset is the config argument: ``--config=configs/toy_2d_vp.py:swiss_roll``
(``checkerboard`` by default; also ``gaussian_mixture`` and ``two_moons``).
"""

from __future__ import annotations

import ml_collections


def get_default_configs(dataset: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 42

    config.training = training = ml_collections.ConfigDict()
    training.sde = "vpsde"
    training.batch_size = 512
    training.n_iters = 10000
    training.snapshot_freq = 5000
    training.snapshot_freq_for_preemption = 1000
    training.log_freq = 500
    training.eval_freq = 1000
    training.snapshot_sampling = True
    training.snapshot_num_samples = 4000
    training.likelihood_weighting = False
    training.label_dropout = 0.0  # > 0: drop class labels for classifier-free guidance
    training.continuous = True
    training.reduce_mean = True
    # One optimisation step per jitted call: on CPU as fast as ten written out
    # (experiments/benchmarks/train_step.py, batch 512: 15.1 against 15.7 ms per step) and
    # compiled in a sixth of the time (1.5 against 8.7 s).
    training.n_jitted_steps = 1

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
    sampling.num_steps = 500
    sampling.ode_method = "dpm_solver_3"
    sampling.rtol = 1e-5
    sampling.atol = 1e-5

    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.batch_size = 1000
    evaluate.num_samples = 4000
    evaluate.enable_loss = True
    evaluate.enable_bpd = True
    evaluate.bpd_num_batches = 1
    evaluate.bpd_dataset = "test"
    evaluate.bpd_num_passes = 1  # passes with fresh dequantisation noise and probes

    config.data = data = ml_collections.ConfigDict()
    data.dataset = dataset or "checkerboard"
    data.centered = ml_collections.FieldReference(True)  # toy data live in their own range
    data.random_flip = False
    data.uniform_dequantization = False

    config.model = model = ml_collections.ConfigDict()
    model.name = "mlp"
    model.nf = 128
    model.num_layers = 3
    model.nonlinearity = "swish"
    model.embedding_type = "positional"
    model.fourier_scale = 16.0
    model.scale_by_sigma = False
    model.init_scale = 0.0
    model.dropout = 0.0
    model.ema_rate = 0.999
    model.dtype = "float32"
    model.num_classes = 0
    model.centered = data.get_ref("centered")
    model.sigma_min = 0.01
    model.sigma_max = (
        12.0  # about the largest distance between two toy data points (checkerboard: 11.3)
    )
    model.num_scales = 1000
    model.beta_min = 0.1
    model.beta_max = 20.0

    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = "Adam"
    optim.lr = 1e-3
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup = 200
    optim.grad_clip = 1.0
    return config
