"""Evaluation of a trained workdir: likelihood (bits/dim), sample quality, samples.

``python -m diffusion_sde.main --mode=eval --config=... --workdir=DIR`` evaluates the EMA
parameters of the newest checkpoint, or, when ``config.eval.begin_ckpt >= 1``, of every
snapshot ``k = begin_ckpt .. end_ckpt`` (the 2021 reference's numbering: snapshot ``k`` is
step ``k * training.snapshot_freq``; snapshots not in the workdir are listed and skipped):

- bits/dim on ``config.eval.bpd_dataset`` (``eval.enable_bpd``), written to
  ``DIR/eval/bpd_step_<step>.json``;
- sample quality (``eval.enable_sampling``): ``eval.num_samples`` samples drawn as
  ``--mode=sample`` does (50,000 in the CIFAR-10 configs, as published numbers use),
  clipped to [0, 1] and quantised to 8-bit pixels (``eval.quantization``: ``floor`` as the
  2021 reference, or ``round`` as EDM), then FID, KID and the Inception Score (over
  ``eval.is_splits`` splits) against the training split through ``eval.feature_extractor``
  (default: the digits / MNIST classifiers for those datasets, Inception-v3 otherwise,
  whose reference statistics come from ``eval.reference_stats``, written by
  ``python -m diffusion_sde.evaluation.reference_stats``), in
  ``DIR/eval/sample_quality_step_<step>.json``;
- one row per evaluated checkpoint in ``DIR/eval/results.jsonl`` (step, snapshot,
  bits/dim, FID, KID, IS, number of samples), printed as a table at the end.

The likelihood, and samples of ``sampling.method='ode'``, of a discretely trained VP model
use the continuous score adapter by default (``sampling.ode_continuous_score``; see
``models.continuous_labels``).

``--mode=sample`` draws ``config.eval.num_samples`` samples in shards under
``DIR/eval/samples_step_<step>/``. Everything is resumable: finished bits/dim batches and
sample shards are kept and skipped when the command is run again. The shards are reused
only for the sampler that drew them (``sampler.json`` in the folder records
``config.sampling``, the shard size and the seed): rerun with another sampler and the old
folder is set aside as ``samples_step_<step>.previous_<k>`` (kept, never deleted) and new
samples are drawn.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_sde import data as data_lib
from diffusion_sde import errors, likelihood, plotting, sampling
from diffusion_sde.evaluation import metrics, reference_stats
from diffusion_sde.models import continuous_labels, get_score_fn
from diffusion_sde.training import checkpoint as checkpoint_lib


def checkpoint_steps(config, workdir: str | pathlib.Path) -> list[int | None]:
    """The steps ``--mode=eval`` evaluates: ``[None]`` (the newest checkpoint) unless
    ``config.eval.begin_ckpt >= 1``, else the steps ``k * training.snapshot_freq`` of the
    snapshots ``k = begin_ckpt .. end_ckpt`` that are in ``workdir`` (the missing ones are
    logged; none at all is an error that lists what the workdir has)."""
    evaluation = config.eval
    begin = evaluation.get("begin_ckpt", 0) or 0
    if begin < 1:
        return [None]
    end = evaluation.get("end_ckpt", begin)
    if end < begin:
        raise ValueError(f"eval.end_ckpt ({end}) is before eval.begin_ckpt ({begin}).")
    directory = pathlib.Path(workdir).absolute() / "checkpoints"
    available = checkpoint_lib.available_steps(workdir)
    freq = config.training.snapshot_freq
    wanted = {k: k * freq for k in range(begin, end + 1)}
    steps = [step for step in wanted.values() if step in available]
    missing = [k for k, step in wanted.items() if step not in available]
    if not steps:
        raise errors.MissingCheckpointError(
            f"None of the snapshots {begin}..{end} (steps {begin * freq}..{end * freq}, "
            f"training.snapshot_freq={freq}) is in {directory}; it has the steps "
            f"{available}. Set --config.eval.begin_ckpt / end_ckpt to snapshots it has, or "
            "--config.eval.begin_ckpt=0 for the newest checkpoint."
        )
    if missing:
        logging.warning("Snapshots %s are not in %s; evaluating the others.", missing, directory)
    return steps


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
    continuous = continuous_labels(config, ode=True)
    score_fn = get_score_fn(sde, model, {"params": params}, continuous=continuous)
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
    """``--mode=eval``: bits/dim and sample quality of the EMA parameters of the newest
    checkpoint, or of each snapshot of ``eval.begin_ckpt .. eval.end_ckpt``
    (:func:`checkpoint_steps`), as ``config.eval`` enables them.

    Returns ``{"bpd": ..., "sample_quality": ...}`` (the results that were computed) for
    one checkpoint, and ``{"rows": [...]}`` (also in ``workdir/eval/results.jsonl``, one
    row per checkpoint) for a sweep.
    """
    workdir = pathlib.Path(workdir)
    steps = checkpoint_steps(config, workdir)
    rows, results = [], {}
    for step in steps:
        results = {}
        if config.eval.get("enable_bpd", True):
            results["bpd"] = evaluate_bpd(config, workdir, step)
        if config.eval.get("enable_sampling", False):
            results["sample_quality"] = evaluate_sample_quality(config, workdir, step)
        if results:
            rows.append(_result_row(config, results))
            _write_results(workdir / "eval" / "results.jsonl", rows[-1])
    if rows:
        _print_table(rows)
    return results if steps == [None] else {"rows": rows}


def _result_row(config, results: dict) -> dict:
    bpd, quality = results.get("bpd"), results.get("sample_quality")
    step = (bpd or quality)["step"]
    freq = config.training.get("snapshot_freq", 0)
    row = {"step": step, "ckpt": step // freq if freq and step % freq == 0 else None}
    if bpd is not None:
        row |= {bpd["unit"]: bpd["mean"], "standard_error": bpd["standard_error"]}
    if quality is not None:
        row |= {
            name: quality[name]
            for name in ("fid", "kid_mean", "inception_score", "num_samples", "extractor")
        }
    return row


def _write_results(path: pathlib.Path, row: dict) -> None:
    """Add ``row`` to the JSON lines of ``path``, replacing an earlier row of its step."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: dropped
                continue
    rows = sorted(
        [r for r in rows if r.get("step") != row["step"]] + [row], key=lambda r: r["step"]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(json.dumps(r) + "\n" for r in rows))
    temporary.replace(path)


def _print_table(rows: list[dict]) -> None:
    columns = [c for c in rows[0] if c not in ("standard_error",)]
    cell = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(cell(row.get(c)) for c in columns))


def evaluate_bpd(config, workdir: str | pathlib.Path, step: int | None = None) -> dict:
    """Bits/dim (nats/dim for toy data) of the EMA parameters of the checkpoint of ``step``
    (None: the newest), written to ``workdir/eval/bpd_step_<step>.json``; finished batches
    are kept in ``workdir/eval/bpd_step_<step>/`` so that a killed evaluation resumes."""
    workdir = pathlib.Path(workdir)
    sde, model, state = checkpoint_lib.load_trained(config, workdir, step)
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


def evaluate_sample_quality(config, workdir: str | pathlib.Path, step: int | None = None) -> dict:
    """FID, KID and IS of ``config.eval.num_samples`` samples of the checkpoint of ``step``
    (None: the newest; drawn by :func:`sample`, or reused from an earlier run) against the
    training split, written to ``workdir/eval/sample_quality_step_<step>.json``.

    Samples are quantised (``eval.quantization``, default ``floor``) as
    :func:`metrics.sample_quality` describes; the IS takes ``eval.is_splits`` splits.

    The features come from ``config.eval.feature_extractor`` (``metrics.FEATURE_EXTRACTORS``;
    by default the project's own classifier for ``digits`` and ``mnist``, Inception-v3
    otherwise). The reference is ``config.eval.reference_stats`` (an ``.npz`` from
    ``python -m diffusion_sde.evaluation.reference_stats``) or, when that is empty, computed from the
    training split and cached as ``workdir/eval/reference_<dataset>_<extractor>.npz``.
    """
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
                "training split once with `python -m diffusion_sde.evaluation.reference_stats "
                "--config=... --extractor=inception_v3 --out=FILE.npz` and pass "
                "--config.eval.reference_stats=FILE.npz."
            )
        dataset = config.data.dataset.replace("/", "_")
        reference = workdir / "eval" / f"reference_{dataset}_{name}.npz"
        if not reference.exists():
            statistics = reference_stats.compute_reference_statistics(config.data, extractor)
            reference_stats.save_statistics(statistics, reference)
    shards = sample(config, workdir, step)
    samples = np.concatenate(
        [np.load(path)["samples"] for path in sorted(shards.glob("shard_*.npz"))]
    )[: evaluation.num_samples]
    result = metrics.sample_quality(
        samples,
        reference,
        extractor,
        rounding=evaluation.get("quantization", "floor"),
        is_splits=evaluation.get("is_splits", 1),
    )
    result["step"] = int(shards.name.rsplit("_", 1)[-1])
    path = workdir / "eval" / f"sample_quality_step_{result['step']:08d}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    kid = "n/a" if result["kid_mean"] is None else f"{result['kid_mean']:.4f}"
    score = result["inception_score"]
    score = "n/a" if score is None else f"{score:.3f} ± {result['inception_score_std']:.3f}"
    print(
        f"FID ({name} features): {result['fid']:.3f}, KID: {kid}, IS: {score} "
        f"({result['num_samples']} samples, step {result['step']}) -> {path}"
    )
    return result


def _sample_folder(config, out: pathlib.Path) -> pathlib.Path:
    """``out``, made for the samples of ``config``'s sampler: a folder whose shards another
    sampler (or shard size, or seed) drew is renamed ``<out>.previous_<k>`` first."""
    drawn_by = {
        "sampling": config.sampling.to_dict(),
        "batch_size": config.eval.batch_size,
        "seed": config.seed,
    }
    drawn_by = json.loads(json.dumps(drawn_by, sort_keys=True, default=str))
    record = out / "sampler.json"
    if out.exists():
        previous = json.loads(record.read_text()) if record.exists() else None
        if previous == drawn_by:
            return out
        if previous is not None or any(out.glob("shard_*.npz")):
            k = 1
            while out.with_name(f"{out.name}.previous_{k}").exists():
                k += 1
            aside = out.rename(out.with_name(f"{out.name}.previous_{k}"))
            logging.info("Samples in %s were drawn by another sampler; kept in %s.", out, aside)
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(drawn_by, indent=2, sort_keys=True) + "\n")
    return out


def sample(config, workdir: str | pathlib.Path, step: int | None = None) -> pathlib.Path:
    """``--mode=sample``: ``config.eval.num_samples`` samples from the checkpoint of ``step``
    (None: the newest), in shards of ``config.eval.batch_size``; shards already written are
    skipped."""
    from tqdm.auto import tqdm

    workdir = pathlib.Path(workdir)
    sde, model, state = checkpoint_lib.load_trained(config, workdir, step)
    step = int(state.step)
    shape = (config.eval.batch_size, *data_lib.data_shape(config.data))
    sampler = sampling.get_sampler(config.sampling, sde, shape)
    continuous = continuous_labels(config, ode=config.sampling.get("method", "pc").lower() == "ode")
    inverse_scaler = data_lib.get_data_inverse_scaler(config.data)

    @jax.jit
    def draw(params, key):
        score_fn = get_score_fn(sde, model, {"params": params}, continuous=continuous)
        samples, nfe = sampler(key, score_fn)
        return inverse_scaler(samples), nfe

    out = _sample_folder(config, workdir / "eval" / f"samples_step_{step:08d}")
    num_shards = math.ceil(config.eval.num_samples / config.eval.batch_size)
    key = jax.random.PRNGKey(config.seed + 4)
    for shard in tqdm(range(num_shards), desc="sample", unit="shard"):
        path = out / f"shard_{shard:05d}"
        if path.with_suffix(".npz").exists():
            continue
        samples, nfe = draw(state.ema_params, jax.random.fold_in(key, shard))
        plotting.save_samples(np.asarray(samples), path, title=f"step {step}, {int(nfe)} NFE")
    return out
