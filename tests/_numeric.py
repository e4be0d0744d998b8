"""Shared assertion helper for the tensor-math tests."""

import torch

NAN = float("nan")


def close(actual, expected, atol=1e-6):
    """Equal within an absolute tolerance, compared in fp64 (no relative slack)."""
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )
