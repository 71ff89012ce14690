"""Triton kernels of the recurrent scan (installs as fusedrnn.kernels). Importing this package
touches no GPU: devices are looked at only when a launcher runs.

    scan.py      scan_fwd_kernel / scan_bwd_kernel (every mode, stepwise or persistent), the LSTM
                 projection kernels, and their launchers scan_forward / scan_backward
    plan.py      device limits and launch plans: step_config, proj_config, persistent_plan, plan_for
    lstm.py, gru.py, rnn.py, activations.py   the cell math (device functions)
    common.py    device functions shared by the kernels (gate tiles, dots, row liveness, barrier)
    barrier.py   grid_barrier_kernel, the cost of one empty step barrier, and its launcher
    launch.py    argument checks, allocation and the counted launch shared by the launchers
    aot.py       every configuration the launchers pick, compiled ahead of time (no GPU needed)
"""
from .barrier import grid_barrier
from .launch import launch_count, set_poison
from .plan import (PersistentPlan, StepConfig, device_limits, persistent_plan, plan_for, proj_config,
                   step_config)
from .scan import scan_backward, scan_forward

__all__ = ["scan_forward", "scan_backward", "plan_for", "device_limits", "persistent_plan", "step_config",
           "proj_config", "StepConfig", "PersistentPlan", "launch_count", "set_poison", "grid_barrier"]
