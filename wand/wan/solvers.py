"""Wan2.2's ``--sample_solver dpm++`` as a diffusers scheduler.

Wan2.2 samples ``dpm++`` with its ``FlowDPMSolverMultistepScheduler``, a copy of diffusers'
DPM-Solver++ (order 2, midpoint, lower order at the end, final sigma 0) for flow matching, on
the sigmas of its ``get_sampling_sigmas``: ``linspace(1, 0, steps + 1)[:steps]``, shifted.
diffusers' ``DPMSolverMultistepScheduler`` with flow sigmas takes the same steps, but on a grid
that starts at 0.999 instead of 1; :class:`FlowDPMSolver` gives it Wan2.2's grid, with which it
computes what Wan2.2's scheduler computes. (``unipc`` is diffusers' ``UniPCMultistepScheduler``
with flow sigmas, the scheduler diffusers ships with Wan: :func:`wand.client.pipeline.build`.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler

TRAIN_TIMESTEPS = 1000  # wan/configs/shared_config.py: num_train_timesteps


def sampling_sigmas(steps: int, shift: float) -> np.ndarray:
    """Wan2.2's ``get_sampling_sigmas`` (wan/utils/fm_solvers.py)."""
    sigma = np.linspace(1, 0, steps + 1)[:steps]
    return shift * sigma / (1 + (shift - 1) * sigma)


class FlowDPMSolver(DPMSolverMultistepScheduler):
    """DPM-Solver++ on Wan2.2's sigma grid (the config's ``flow_shift`` is Wan2.2's shift)."""

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, **kw: Any):
        super().set_timesteps(num_inference_steps, device, **kw)
        if kw.get("timesteps") is not None:
            return
        sigmas = sampling_sigmas(self.num_inference_steps, self.config.flow_shift)
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
        steps = torch.from_numpy(sigmas * self.config.num_train_timesteps)
        self.timesteps = steps.to(device=device, dtype=torch.int64)


def dpm_solver(shift: float) -> FlowDPMSolver:
    """The scheduler of ``--sample_solver dpm++`` at flow shift ``shift``."""
    return FlowDPMSolver(
        num_train_timesteps=TRAIN_TIMESTEPS,
        solver_order=2,
        prediction_type="flow_prediction",
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
        use_flow_sigmas=True,
        flow_shift=shift,
    )
