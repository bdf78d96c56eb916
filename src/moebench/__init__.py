"""moebench: a reproducible benchmark of Mixture-of-Experts routing and load balancing."""

__version__ = "0.1.0"
