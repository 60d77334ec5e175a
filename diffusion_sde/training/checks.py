"""A config checked before a run starts: every name of an implementation, the sizes that
must be positive, what the builders of a run check, and whether the network takes the
data's shape, each reported as an :class:`~diffusion_sde.errors.ConfigError` in one line
(with the nearest valid name for a misspelt one) before anything compiles."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from diffusion_sde import (
    data,
    errors,
    losses,
    models,
    ode_solvers,
    parametrization,
    sampling,
    sde_solvers,
)
from diffusion_sde import sde as sde_lib
from diffusion_sde.training import state as state_lib
from diffusion_sde.training import step as step_lib


def _name_fields(config) -> list[tuple[str, Any, Iterable[str]]]:
    """``(field, value, valid names)`` of every config field that names an implementation,
    from the dictionaries the library chooses from."""
    fields = [
        ("training.sde", str(config.training.sde).lower(), sde_lib.SDES),
        ("model.name", config.model.name, models.MODELS),
        ("optim.optimizer", str(config.optim.optimizer).lower(), state_lib.OPTIMIZERS),
    ]
    optional = [
        ("model", "parametrization", parametrization.PARAMETRIZATIONS),
        ("training", "weighting", losses.WEIGHTINGS),
        ("training", "time_distribution", losses.TIME_DISTRIBUTIONS),
    ]
    for group, name, valid in optional:
        if config[group].get(name) is not None:  # else the path's / the 2021 default
            fields.append((f"{group}.{name}", str(config[group][name]), valid))
    dataset = str(config.data.dataset)
    if not dataset.startswith("lsun/"):  # data.data_shape checks the LSUN category
        names = [*data.BUILTIN_DATASETS, *(n for n in data.TFDS_DATASETS if n != "lsun")]
        fields.append(("data.dataset", dataset, names))
    method = str(config.sampling.get("method", "pc")).lower()
    fields.append(("sampling.method", method, ("pc", "ode", "sde", "edm")))
    if method == "pc":
        fields += [
            ("sampling.predictor", str(config.sampling.predictor).lower(), sampling.PREDICTORS),
            ("sampling.corrector", str(config.sampling.corrector).lower(), sampling.CORRECTORS),
        ]
    solvers = {
        "ode": ("ode_method", ode_solvers.METHODS),
        "sde": ("sde_method", sde_solvers.METHODS),
    }
    if method in solvers:
        name, valid = solvers[method]
        if config.sampling.get(name) is not None:  # else get_sampler's default
            fields.append((f"sampling.{name}", str(config.sampling[name]).lower(), valid))
        if config.sampling.get("time_grid") is not None:
            grid = config.sampling.time_grid
            fields.append(("sampling.time_grid", grid, ode_solvers.TIME_GRIDS))
    return fields


_POSITIVE_INTEGERS = (
    "training.batch_size",
    "training.n_jitted_steps",
    "training.snapshot_freq",
    "training.snapshot_freq_for_preemption",
    "training.log_freq",
    "training.eval_freq",
    "eval.batch_size",
    "eval.num_samples",
)


def check_config(config) -> None:
    """Raise a :class:`~diffusion_sde.errors.ConfigError` for the first thing in ``config`` that cannot work.

    In order: every name of an implementation (with the nearest valid name), the sizes
    and frequencies that must be positive, then what the library's builders check
    (``data.data_shape``, ``get_sde``, ``get_model``, ``get_optimizer``,
    ``sampling.get_sampler``, the loss), and last whether the network takes the data's
    shape (``jax.eval_shape`` of its initialisation: no compilation, no memory).
    """
    for field, value, valid in _name_fields(config):
        if value not in valid:
            raise errors.unknown_name(field, value, valid)
    for field in _POSITIVE_INTEGERS:
        group, name = field.split(".")
        value = config[group].get(name) if group in config else None
        if value is not None and (not isinstance(value, int) or value < 1):
            raise errors.ConfigError(f"{field}={value!r} must be a positive integer.")
    if config.training.get("n_iters", 0) < 0:
        raise errors.ConfigError(f"training.n_iters={config.training.n_iters} must be >= 0.")
    try:
        shape, model = _build(config)
    except errors.UserError:
        raise
    except ValueError as error:  # the builders' own checks: messages written for the user
        raise errors.ConfigError(str(error)) from error
    _check_model_takes_data(config, model, shape)


def _build(config):
    """Run the builders a training run starts with; their ValueErrors are about the config."""
    shape = data.data_shape(config.data)
    sde = sde_lib.get_sde(config)
    model = models.get_model(config.model)
    state_lib.get_optimizer(config.optim)
    training = config.training
    step_lib.loss_fn_from_config(config, sde, model)
    num_samples = int(training.get("snapshot_num_samples", 64))
    sampling.get_sampler(config.sampling, sde, (num_samples, *shape))
    return shape, model


def _check_model_takes_data(config, model, shape: tuple[int, ...]) -> None:
    try:
        state_lib.abstract_train_state(config, model, state_lib.get_optimizer(config.optim))
    except Exception as error:  # noqa: BLE001 -- any failure here is the shape's
        hint = ""
        ch_mult = config.model.get("ch_mult")
        if len(shape) == 3 and ch_mult is not None:
            factor = 2 ** (len(ch_mult) - 1)
            if shape[0] % factor:
                hint = (
                    f" With {len(ch_mult)} resolutions (model.ch_mult={tuple(ch_mult)}) the "
                    f"image size must be a multiple of {factor}: change data.image_size or "
                    "shorten model.ch_mult."
                )
        elif len(shape) == 1 and config.model.name != "mlp":
            hint = " Vector (toy 2-D) data needs model.name='mlp'."
        elif len(shape) == 3 and config.model.name == "mlp":
            hint = " Images need a convolutional network: model.name='ncsnpp' or 'ddpm'."
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
        raise errors.ConfigError(
            f"model.name={config.model.name!r} cannot take data of shape {shape} "
            f"(data.dataset={config.data.dataset!r}): {type(error).__name__}: {reason}.{hint}"
        ) from error
