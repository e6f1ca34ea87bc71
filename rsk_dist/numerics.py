"""What float arithmetic and what determinism a run asks of torch: TF32 and deterministic algorithms.

On the CPU, with the same torch build and thread count, a step is a pure function of its inputs:
the tests check runs and resumes bit for bit there. On CUDA, by default, cuDNN picks convolution
algorithms whose weight gradients add in a varying order, and TF32 rounds float32 matmul and
convolution inputs to 10-bit mantissas (on Ampere and later). With ``deterministic``, repeated
CUDA runs agree bit for bit on one machine and software stack (the loss's ``scatter_add_`` and
``index_add_`` have deterministic CUDA kernels; an operation without one raises instead of
running); across GPU models, drivers or worker counts they agree within float rounding, not bit
for bit. Needs torch only.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

# cuBLAS's reproducible workspace setting (see the CUDA docs on cuBLAS reproducibility).
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def configure(deterministic: bool = False, tf32: bool = False) -> None:
    """Process-wide settings of a training worker, before its model is built and before its
    first CUDA matmul (cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when it creates its handle).
    ``tf32``: the model's float32 convolutions and matmuls may use TF32 (torch's default lets
    cuDNN do so); off, ``autocast: none`` computes in float32. The loss sets its own precision
    (:func:`loss_matmul_precision`)."""
    if deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
        torch.backends.cudnn.benchmark = False  # autotuning may pick another algorithm each run
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32


@contextlib.contextmanager
def loss_matmul_precision(tf32: bool) -> Iterator[None]:
    """The loss's float32 matmuls in TF32 or in full float32, whatever the process's setting:
    at tau2 = 0.01 a similarity off by TF32's 1e-3 moves a sigmoid argument by 0.1."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
