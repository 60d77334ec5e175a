"""Evaluation of a trained workdir: likelihood (bits/dim), sample quality, samples.

``python -m diffusion_sde.main --mode=eval --config=... --workdir=DIR`` evaluates the EMA
parameters of the newest checkpoint:

- bits/dim on ``config.eval.bpd_dataset`` (``eval.enable_bpd``), written to
  ``DIR/eval/bpd_step_<step>.json``;
- sample quality (``eval.enable_sampling``): ``eval.num_samples`` samples drawn as
  ``--mode=sample`` does, then FID and KID against the training split through
  ``eval.feature_extractor`` (default: the digits / MNIST classifiers for those datasets,
  Inception-v3 otherwise, whose reference statistics come from ``eval.reference_stats``,
  written by ``python -m diffusion_sde.reference_stats``), in
  ``DIR/eval/sample_quality_step_<step>.json``.

``--mode=sample`` draws ``config.eval.num_samples`` samples in shards under
``DIR/eval/samples_step_<step>/``. Everything is resumable: finished bits/dim batches and
sample shards are kept and skipped when the command is run again.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_sde import data as data_lib
from diffusion_sde import likelihood, plotting, sampling
from diffusion_sde.models import get_model, get_score_fn
from diffusion_sde.sde import get_sde
from diffusion_sde.train import check_state_spec, create_train_state, get_optimizer, restore_latest


def load_trained(config, workdir: str | pathlib.Path):
    """``(sde, model, state)`` from the newest readable checkpoint of ``workdir``."""
    import orbax.checkpoint as ocp

    model = get_model(config.model)
    init = functools.partial(
        create_train_state,
        model=model,
        optimizer=get_optimizer(config.optim),
        data_shape=data_lib.data_shape(config.data),
        conditional=config.model.get("num_classes", 0) > 0,
    )
    abstract_state = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
    check_state_spec(pathlib.Path(workdir), abstract_state, write=False)
    # Restore onto this process's first device, whatever topology wrote the checkpoint.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_state = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), abstract_state
    )
    manager = ocp.CheckpointManager(
        pathlib.Path(workdir).absolute() / "checkpoints",
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    state, step = restore_latest(manager, abstract_state)
    manager.close()
    if state is None:
        raise FileNotFoundError(
            f"No readable checkpoint under {workdir}/checkpoints; train first with "
            f"--mode=train and the same --workdir."
        )
    return get_sde(config), model, state


def evaluate_likelihood(
    config, sde, model, params, *, key, num_batches=None, num_passes=1, cache_dir=None
) -> dict:
    """Bits/dim (image data) or nats/dim (continuous toy data) on the evaluation split.

    Image data are mapped back to integer pixels ``n = round(x * (L - 1))`` (``x`` in
    [0, 1]) and scored with :func:`likelihood.bits_per_dim` (uniform dequantisation, the
    change-of-variables offset of the data scaling). ``num_passes`` passes over the data
    draw fresh dequantisation noise and Hutchinson probes (the 2021 reference's
    ``num_repeats``). With ``cache_dir`` every finished (pass, batch) is saved there and
    skipped when the evaluation is run again, so a killed evaluation resumes.

    Returns the mean over passes and examples; its standard error over examples (of each
    example's mean over passes, since the passes of one example are not independent); the
    mean of each pass; the number of examples and the mean NFE.
    """
    from tqdm.auto import tqdm

    levels = data_lib.num_levels(config.data)
    inverse_scaler = data_lib.get_data_inverse_scaler(config.data)
    score_fn = get_score_fn(sde, model, {"params": params}, continuous=config.training.continuous)
    centered = bool(config.data.centered)
    evaluation = config.eval
    tolerances = dict(rtol=evaluation.get("rtol", 1e-5), atol=evaluation.get("atol", 1e-5))

    @jax.jit
    def per_example(key, x):
        if levels is None:
            logp, _, nfe = likelihood.log_likelihood(key, sde, score_fn, x, **tolerances)
            return -logp / math.prod(x.shape[1:]), nfe
        pixels = jnp.round(inverse_scaler(x) * (levels - 1))
        return likelihood.bits_per_dim(
            key, sde, score_fn, pixels, centered=centered, num_levels=levels, **tolerances
        )

    def batches():
        iterator = data_lib.get_dataset(
            config.data,
            batch_size=evaluation.batch_size,
            split=evaluation.get("bpd_dataset", "test"),
            seed=config.seed,
            evaluation=True,
        )
        for index, batch in enumerate(iterator):
            if num_batches is not None and index >= num_batches:
                return
            yield index, batch

    if cache_dir is not None:
        cache_dir = pathlib.Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
    passes, nfes = [], []
    for pass_index in range(num_passes):
        values = []
        progress = tqdm(batches(), desc=f"bpd pass {pass_index + 1}/{num_passes}", unit="batch")
        for index, batch in progress:
            path = None if cache_dir is None else cache_dir / f"pass_{pass_index}_{index:05d}.npz"
            if path is not None and path.exists():
                with np.load(path) as saved:
                    value, nfe = saved["value"], int(saved["nfe"])
            else:
                batch_key = jax.random.fold_in(jax.random.fold_in(key, pass_index), index)
                value, nfe = per_example(batch_key, jnp.asarray(batch["x"]))
                value, nfe = np.asarray(value), int(nfe)
                if "mask" in batch:
                    value = value[np.asarray(batch["mask"], bool)]
                if path is not None:
                    plotting.save_npz(path, value=value, nfe=nfe)
            values.append(value)
            nfes.append(nfe)
            progress.set_postfix(mean=f"{np.concatenate(values).mean():.4f}", nfe=nfe)
        passes.append(np.concatenate(values))
    per_example_mean = np.mean(passes, axis=0)
    count = len(per_example_mean)
    return {
        "unit": "nats_per_dim" if levels is None else "bits_per_dim",
        "mean": float(per_example_mean.mean()),
        "standard_error": float(per_example_mean.std(ddof=1) / np.sqrt(count))
        if count > 1
        else None,
        "pass_means": [float(values.mean()) for values in passes],
        "num_examples": int(count),
        "num_passes": int(num_passes),
        "mean_nfe": float(np.mean(nfes)),
    }


def evaluate(config, workdir: str | pathlib.Path) -> dict:
    """``--mode=eval``: bits/dim and sample quality of the newest checkpoint's EMA
    parameters, as ``config.eval`` enables them; returns ``{"bpd": ..., "sample_quality":
    ...}`` with the results that were computed."""
    workdir = pathlib.Path(workdir)
    results = {}
    if config.eval.get("enable_bpd", True):
        results["bpd"] = evaluate_bpd(config, workdir)
    if config.eval.get("enable_sampling", False):
        results["sample_quality"] = evaluate_sample_quality(config, workdir)
    return results


def evaluate_bpd(config, workdir: str | pathlib.Path) -> dict:
    """Bits/dim (nats/dim for toy data) of the newest checkpoint's EMA parameters, written
    to ``workdir/eval/bpd_step_<step>.json``; finished batches are kept in
    ``workdir/eval/bpd_step_<step>/`` so that a killed evaluation resumes."""
    workdir = pathlib.Path(workdir)
    sde, model, state = load_trained(config, workdir)
    step = int(state.step)
    stem = workdir / "eval" / f"bpd_step_{step:08d}"
    result = evaluate_likelihood(
        config,
        sde,
        model,
        state.ema_params,
        key=jax.random.PRNGKey(config.seed + 3),
        num_batches=config.eval.get("bpd_num_batches", None),
        num_passes=config.eval.get("bpd_num_passes", 1),
        cache_dir=stem,
    )
    result["step"] = step
    path = stem.with_suffix(".json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    standard_error = result["standard_error"] or float("nan")
    logging.info("Step %d: %s -> %s", step, result, path)
    print(
        f"{result['unit']}: {result['mean']:.4f} ± {standard_error:.4f} "
        f"({result['num_examples']} examples x {result['num_passes']} passes, step {step}, "
        f"mean NFE {result['mean_nfe']:.0f}) -> {path}"
    )
    return result


def evaluate_sample_quality(config, workdir: str | pathlib.Path) -> dict:
    """FID and KID of ``config.eval.num_samples`` samples (drawn by :func:`sample`, or
    reused from an earlier run) against the training split, written to
    ``workdir/eval/sample_quality_step_<step>.json``.

    The features come from ``config.eval.feature_extractor`` (``metrics.FEATURE_EXTRACTORS``;
    by default the project's own classifier for ``digits`` and ``mnist``, Inception-v3
    otherwise). The reference is ``config.eval.reference_stats`` (an ``.npz`` from
    ``python -m diffusion_sde.reference_stats``) or, when that is empty, computed from the
    training split and cached as ``workdir/eval/reference_<dataset>_<extractor>.npz``.
    """
    from diffusion_sde import metrics, reference_stats

    workdir = pathlib.Path(workdir)
    evaluation = config.eval
    name = evaluation.get("feature_extractor") or reference_stats.default_extractor(
        config.data.dataset
    )
    options = {"weights_path": evaluation.get("inception_weights") or None}
    extractor = metrics.get_feature_extractor(name, **(options if name == "inception_v3" else {}))
    reference = evaluation.get("reference_stats") or None
    if reference is None:
        if name == "inception_v3":
            raise ValueError(
                "eval.reference_stats is empty: compute the Inception statistics of the "
                "training split once with `python -m diffusion_sde.reference_stats "
                "--config=... --extractor=inception_v3 --out=FILE.npz` and pass "
                "--config.eval.reference_stats=FILE.npz."
            )
        dataset = config.data.dataset.replace("/", "_")
        reference = workdir / "eval" / f"reference_{dataset}_{name}.npz"
        if not reference.exists():
            statistics = reference_stats.compute_reference_statistics(config.data, extractor)
            reference_stats.save_statistics(statistics, reference)
    shards = sample(config, workdir)
    samples = np.concatenate(
        [np.load(path)["samples"] for path in sorted(shards.glob("shard_*.npz"))]
    )[: evaluation.num_samples]
    result = metrics.sample_quality(samples, reference, extractor)
    result["step"] = int(shards.name.rsplit("_", 1)[-1])
    path = workdir / "eval" / f"sample_quality_step_{result['step']:08d}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    kid = "n/a" if result["kid_mean"] is None else f"{result['kid_mean']:.4f}"
    print(
        f"FID ({name} features): {result['fid']:.3f}, KID: {kid} "
        f"({result['num_samples']} samples, step {result['step']}) -> {path}"
    )
    return result


def sample(config, workdir: str | pathlib.Path) -> pathlib.Path:
    """``--mode=sample``: ``config.eval.num_samples`` samples from the newest checkpoint,
    in shards of ``config.eval.batch_size``; shards already written are skipped."""
    from tqdm.auto import tqdm

    workdir = pathlib.Path(workdir)
    sde, model, state = load_trained(config, workdir)
    step = int(state.step)
    shape = (config.eval.batch_size, *data_lib.data_shape(config.data))
    sampler = sampling.get_sampler(config.sampling, sde, shape)
    inverse_scaler = data_lib.get_data_inverse_scaler(config.data)

    @jax.jit
    def draw(params, key):
        score_fn = get_score_fn(
            sde, model, {"params": params}, continuous=config.training.continuous
        )
        samples, nfe = sampler(key, score_fn)
        return inverse_scaler(samples), nfe

    out = workdir / "eval" / f"samples_step_{step:08d}"
    out.mkdir(parents=True, exist_ok=True)
    num_shards = math.ceil(config.eval.num_samples / config.eval.batch_size)
    key = jax.random.PRNGKey(config.seed + 4)
    for shard in tqdm(range(num_shards), desc="sample", unit="shard"):
        path = out / f"shard_{shard:05d}"
        if path.with_suffix(".npz").exists():
            continue
        samples, nfe = draw(state.ema_params, jax.random.fold_in(key, shard))
        plotting.save_samples(np.asarray(samples), path, title=f"step {step}, {int(nfe)} NFE")
    return out
