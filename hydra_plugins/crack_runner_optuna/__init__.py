"""The runner's Hydra sweeper plugin (``hydra/sweeper=optuna``): Hydra finds sweepers in the ``hydra_plugins`` namespace only."""
