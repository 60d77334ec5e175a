"""Entry point: ``python -m diffusion_sde.main --config=configs/FILE.py --workdir=DIR``.

``--mode`` is ``train`` (the default; resumes from ``DIR/checkpoints``), ``eval`` or
``sample``. Config fields are overridable on the command line, e.g.
``--config.training.batch_size=64``. On a TPU pod or a GPU cluster pass ``--multihost``
to call ``jax.distributed.initialize()`` (which reads the cluster from the environment)
before anything touches the devices.
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and metrics.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to run.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    import jax

    if FLAGS.multihost:
        jax.distributed.initialize()
    logging.set_verbosity(logging.INFO)
    from diffusion_sde import evaluate, train

    modes = {
        "train": train.train_and_evaluate,
        "eval": evaluate.evaluate,
        "sample": evaluate.sample,
    }
    modes[FLAGS.mode](FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
