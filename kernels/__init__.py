"""Triton kernels of the recurrent scan (installs as fusedrnn.kernels). Importing this package
touches no GPU: devices are only looked at when a launcher runs."""
from .scan import (GATES, MODES, PersistentPlan, StepConfig, launch_count, persistent_plan, proj_config,
                   scan_backward, scan_forward, set_poison, step_config)
from .barrier import grid_barrier

__all__ = ["scan_forward", "scan_backward", "persistent_plan", "launch_count", "PersistentPlan",
           "StepConfig", "step_config", "proj_config", "set_poison", "grid_barrier", "MODES", "GATES"]
