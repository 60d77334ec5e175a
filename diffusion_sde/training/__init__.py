"""Training machinery, below the entry point and above the method.

``state.py`` (the train state, optimizer and their creation), ``step.py`` (the loss of a
network and the jitted, sharded optimisation steps), ``checkpoint.py`` (orbax save and
restore, ``load_trained`` for evaluation, published checkpoints as a workdir),
``workdir.py`` (the run lock, ``metrics.jsonl`` repair), ``checks.py`` (a config checked
before a run), ``classifier.py`` (the classifier-training loop) and ``loop.py``
(``train_and_evaluate``).
"""
