"""Merging LoRA adapters: pure merge maths, named merge methods and the continual RegCL state.

- :mod:`regcl.merging.merge_utils`: functions over tensors (RegMean, TIES, MagMax, ...).
- :mod:`regcl.merging.methods`: whole-adapter merges by name (:func:`merge_adapters`).
- :mod:`regcl.merging.core_space`: Core Space merging (NeurIPS 2025), registered as ``core_space``.
- :mod:`regcl.merging.state`: :class:`ContinualMergeState`, constant-memory domain folding.
"""

from regcl.merging.core_space import CoreSpaceParams, core_space_merge
from regcl.merging.merge_utils import (
    GRAM_WEIGHTINGS,
    gram_scale,
    magmax_merge,
    mean_merge,
    product_regmean_merge,
    refactor_low_rank,
    regmean_merge,
    regmean_solve,
    shrink_gram,
    task_arithmetic_merge,
    ties_merge,
)
from regcl.merging.methods import (
    MERGE_METHODS,
    MagmaxParams,
    MeanParams,
    MergeMethod,
    MergeParams,
    RegclParams,
    RegclProductParams,
    TaskArithmeticParams,
    TiesParams,
    available_methods,
    count_key,
    get_merge_method,
    gram_key,
    make_params,
    merge_adapters,
    register_merge_method,
)
from regcl.merging.state import STREAMING_METHODS, ContinualMergeState

__all__ = [
    "GRAM_WEIGHTINGS",
    "MERGE_METHODS",
    "STREAMING_METHODS",
    "ContinualMergeState",
    "CoreSpaceParams",
    "MagmaxParams",
    "MeanParams",
    "MergeMethod",
    "MergeParams",
    "RegclParams",
    "RegclProductParams",
    "TaskArithmeticParams",
    "TiesParams",
    "available_methods",
    "core_space_merge",
    "count_key",
    "get_merge_method",
    "gram_key",
    "gram_scale",
    "magmax_merge",
    "make_params",
    "mean_merge",
    "merge_adapters",
    "product_regmean_merge",
    "refactor_low_rank",
    "register_merge_method",
    "regmean_merge",
    "regmean_solve",
    "shrink_gram",
    "task_arithmetic_merge",
    "ties_merge",
]
