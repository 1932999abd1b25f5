"""The MLflow record: one tracking path for both trainers, the store, leases, sweeps, files others may have written."""
