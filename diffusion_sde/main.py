"""Entry point: ``python -m diffusion_sde.main --config=configs/FILE.py --workdir=DIR``.

``--mode`` is ``train`` (the default; resumes from ``DIR/checkpoints``), ``eval``,
``sample`` or ``import`` (``--checkpoint=PATH --format=NAME``: a published checkpoint
written into ``DIR`` for ``eval`` and ``sample``; see :mod:`diffusion_sde.checkpoints`). Config fields are overridable on the command line, e.g.
``--config.training.batch_size=64``. On a TPU pod or a GPU cluster pass ``--multihost``
to call ``jax.distributed.initialize()`` (which reads the cluster from the environment)
before anything touches the devices.

Compiled programs are cached on disk (``JAX_COMPILATION_CACHE_DIR``, by default
``~/.cache/diffusion_sde/jax``), so rerunning a command skips most of its compilation.
"""

import logging as python_logging
import os
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and metrics.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample", "import"], "What to run.")
flags.DEFINE_string("checkpoint", None, "--mode=import: the published checkpoint file.")
flags.DEFINE_string(
    "format",
    None,
    "--mode=import: its format (score_sde, score_sde_pytorch, torch_state_dict, diffusers, ...).",
)
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
flags.mark_flags_as_required(["config", "workdir"])


class _OnlyWarningsFromLibraries(python_logging.Filter):
    """Keep orbax's per-save INFO lines out of the run's log; warnings still show."""

    def filter(self, record: python_logging.LogRecord) -> bool:
        return record.levelno >= python_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    del argv
    import jax

    cache = os.environ.get(
        "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path.home() / ".cache" / "diffusion_sde" / "jax")
    )
    jax.config.update("jax_compilation_cache_dir", cache)
    if FLAGS.multihost:
        jax.distributed.initialize()
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_OnlyWarningsFromLibraries())
    from diffusion_sde import checkpoints, evaluate, train

    if FLAGS.mode == "import":
        if not FLAGS.checkpoint or not FLAGS.format:
            raise app.UsageError(
                "--mode=import needs --checkpoint=PATH and --format=NAME, NAME one of "
                f"{sorted(checkpoints.FORMATS)}"
            )
        checkpoints.import_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.format)
        return
    modes = {
        "train": train.train_and_evaluate,
        "eval": evaluate.evaluate,
        "sample": evaluate.sample,
    }
    modes[FLAGS.mode](FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
