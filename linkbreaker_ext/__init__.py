"""linkbreaker-ext: the LinkBreaker inference-time backdoor defense (IEEE TIFS 2022) for PyTorch.

    guard = LinkBreaker.fit(model, x_val, y_val, num_classes=10)
    result = guard(x)          # result.labels, result.verdict (0 accept, 1 alarm, 2 OOD), ...
    guard.save("guard.safetensors"); LinkBreaker.load("guard.safetensors", model)
"""
from .ops import backend_info, guard_head, guard_head_reference
from .config import GuardConfig
from .guard import LinkBreaker
from .verdict import ACCEPT, ALARM, OOD, GuardResult

__all__ = ["LinkBreaker", "GuardConfig", "GuardResult", "ACCEPT", "ALARM", "OOD",
           "guard_head", "guard_head_reference", "backend_info"]
__version__ = "0.1.0"
