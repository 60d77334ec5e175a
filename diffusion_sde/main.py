"""Entry point: ``python -m diffusion_sde.main --config=configs/FILE.py --workdir=DIR``.

``--mode`` is ``train`` (the default; resumes from ``DIR/checkpoints``), ``eval``,
``sample`` or ``import`` (``--checkpoint=PATH --format=NAME``: a published checkpoint
written into ``DIR`` for ``eval`` and ``sample``; see :mod:`diffusion_sde.pretrained`).
Config fields are overridable on the command line, e.g. ``--config.training.batch_size=64``. On a TPU pod or a GPU cluster pass ``--multihost``
to call ``jax.distributed.initialize()`` (which reads the cluster from the environment)
before anything touches the devices.

An error of the user's input (a flag, the config, the workdir, a full disk) is printed as
one line, ``error: ...``, with exit status 2; ``--debug`` shows its traceback too. Bugs
keep their traceback.

Compiled programs are cached on disk (``JAX_COMPILATION_CACHE_DIR``, by default
``~/.cache/diffusion_sde/jax``), so rerunning a command skips most of its compilation.
"""

import logging as python_logging
import os
import sys

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
flags.DEFINE_bool("debug", False, "Show the traceback of user errors too.")
flags.mark_flags_as_required(["config", "workdir"])


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Orbax's notices that the read-only manager evaluation opens is read-only.
_NOTICES = ("Given directory is read only", "CheckpointManagerOptions.read_only=True")


class _QuietLibraries(python_logging.Filter):
    """Keep the run's log to what a user can act on: the libraries' INFO lines (orbax's
    per save, JAX's probe for a TPU backend that is not there) and orbax's read-only
    notices are dropped; the libraries' other warnings and errors still show."""

    def filter(self, record: python_logging.LogRecord) -> bool:
        if record.pathname.startswith(_PACKAGE):
            return True
        if record.levelno < python_logging.WARNING:
            return False
        return not ("/orbax/" in record.pathname and record.getMessage().startswith(_NOTICES))


def _fail(message: str) -> None:
    """Report a user error on one line and exit with status 2."""
    try:  # a progress bar left open by the error would end up after the message
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    except ImportError:
        pass
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _debug_requested(argv) -> bool:
    return any(arg in ("--debug", "--debug=true", "--debug=True", "--debug=1") for arg in argv)


def _parse_flags(argv):
    """absl's flag parsing, with every error of a flag or of the config file told in one
    line (and the nearest valid name where one was misspelt)."""
    from diffusion_sde import errors

    try:
        rest = FLAGS(argv)
        if FLAGS["config"].value is not None:
            FLAGS.config.keys()  # a config file that failed to load raises only when read
        return rest
    except Exception as error:
        if _debug_requested(argv):
            raise
        _fail(errors.describe_flag_error(error, argv))


def main(argv):
    del argv
    import jax

    from diffusion_sde.compilation_cache import enable_compilation_cache

    enable_compilation_cache()
    from diffusion_sde.training import checkpoint, checks, loop

    if FLAGS.multihost:
        jax.distributed.initialize()
    elif FLAGS.mode == "train":  # before anything touches the devices
        loop.use_cpu_devices(int(FLAGS.config.training.batch_size))
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from diffusion_sde import errors, pretrained
    from diffusion_sde.evaluation import evaluate

    def import_published(config, workdir):
        if not FLAGS.checkpoint or not FLAGS.format:
            raise errors.UserError(
                "--mode=import needs --checkpoint=PATH and --format=NAME, NAME one of "
                f"{sorted(pretrained.FORMATS)}."
            )
        checkpoint.import_published(config, workdir, FLAGS.checkpoint, FLAGS.format)

    modes = {
        "train": loop.train_and_evaluate,
        "eval": evaluate.evaluate,
        "sample": evaluate.sample,
        "import": import_published,
    }
    try:
        checks.check_config(FLAGS.config)
        modes[FLAGS.mode](FLAGS.config, FLAGS.workdir)
    except Exception as error:
        user_error = errors.as_user_error(error)
        if user_error is None or FLAGS.debug:
            raise
        _fail(str(user_error))


if __name__ == "__main__":
    from diffusion_sde.host_memory import restart_with_huge_pages

    restart_with_huge_pages()  # glibc reads it at start-up: 25-30% off a CPU training step
    app.run(main, flags_parser=_parse_flags)
