"""A cost model of every strategy's kernel launches: FLOPs, HBM bytes, atomics -> PREDICTED time.

Modules: ``rates`` (device rates and assumptions, one config object per GPU), ``problem`` (the
shape and strategy options), ``launch`` (one launch as data), ``epilogue`` (per-logit fp32 op
counts), ``strategies`` (each strategy as a list of launches), ``predict`` (roofline per launch),
``peers`` (published numbers), ``measured`` (a benchmark CSV beside the predictions),
``report`` (tables and CSV). ``apo-kernels model`` drives it. Nothing here was measured on a GPU.
"""

from .predict import LaunchTime, Prediction, predict, time_launch
from .problem import HEADS, Options, Problem, parse_shape
from .rates import DEVICES, DeviceRates, assumption_lines, device
from .strategies import STRATEGIES, Strategy

__all__ = ["DEVICES", "HEADS", "STRATEGIES", "DeviceRates", "LaunchTime", "Options", "Prediction",
           "Problem", "Strategy", "assumption_lines", "device", "parse_shape", "predict",
           "time_launch"]
