"""Test-wide settings: one torch thread (bitwise reproducible CPU math), Triton in interpreter
mode (kernels run on CPU tensors), no network for Hugging Face libraries."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import torch

torch.set_num_threads(1)
