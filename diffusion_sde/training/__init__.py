"""Training machinery: the train state and step (``step.py``); ``train.py`` runs the loop."""
