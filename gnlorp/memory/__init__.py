"""Memory: predict a run's peak from the model config (estimate), and measure it while it runs (monitor)."""

from .devices import Device, devices, get_device, gpu_count, this_machine
from .estimate import CPU_OVERHEAD, CUDA_CONTEXT, PARTS, Fit, compare, estimate, fit, with_method
from .monitor import MemoryMonitor
from .plan import Plan, plan
from .release import return_freed_memory
from .state import moment_bytes, optimizer_state_parts, predict_optimizer_state_bytes
from .weights import describe_weights

__all__ = [
    "CPU_OVERHEAD", "CUDA_CONTEXT", "PARTS", "Device", "Fit", "MemoryMonitor", "Plan", "compare", "describe_weights",
    "devices", "estimate",
    "fit", "get_device", "gpu_count", "moment_bytes", "optimizer_state_parts", "plan", "predict_optimizer_state_bytes",
    "return_freed_memory", "this_machine", "with_method",
]
