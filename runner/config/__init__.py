"""What a run is: the typed schema over conf/, the checks of keys and limits, what Hydra tells a job."""
