"""moebench: a reproducible benchmark of Mixture-of-Experts routing and load balancing."""

import os

# MLflow (imported lazily by the commands that track) sends no usage telemetry from our runs.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__version__ = "0.1.0"
