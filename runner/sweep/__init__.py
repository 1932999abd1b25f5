"""Optuna sweeps that prune: the search loop behind ``hydra/sweeper=optuna`` and what a trial reports from inside its run.

``search`` runs in the launching process (Hydra's sweeper): it asks Optuna for each trial's
values, launches the trial as a job and tells Optuna how it ended. ``trial`` runs inside each
job: the trainers' epoch end reports ``trainer.monitor`` to the trial and stops the run when the
pruner says so. ``study`` holds what both sides agree on (storage, names, pruners) and ``space``
reads Hydra's sweep grammar into Optuna's distributions.
"""
