"""Merging LoRA adapters: the method catalogue, pure merge maths, named merge functions and the
continual RegCL state.

- :mod:`regcl.merging.catalogue`: the methods by name, what each needs, their parameters
  (no torch: importing it, or this package, loads nothing heavy).
- :mod:`regcl.merging.merge_utils`: functions over tensors (RegMean, TIES, MagMax, ...).
- :mod:`regcl.merging.methods`: whole-adapter merges by name (:func:`merge_adapters`).
- :mod:`regcl.merging.core_space`: Core Space merging (NeurIPS 2025), registered as ``core_space``.
- :mod:`regcl.merging.state`: :class:`ContinualMergeState`, constant-memory domain folding.

The names below are imported from their submodule on first use.
"""

from regcl._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("CATALOGUE", "CORE_INNER_METHODS", "GRAM_WEIGHTINGS", "STATS_METHODS",
                     "STREAMING_METHODS", "CoreSpaceParams", "MagmaxParams", "MeanParams",
                     "MergeParams", "MethodInfo", "RegclParams", "RegclProductParams",
                     "TaskArithmeticParams", "TiesParams", "method_info"), "catalogue"),
    **dict.fromkeys(("core_bases", "core_space_merge"), "core_space"),
    **dict.fromkeys(("gram_scale", "magmax_merge", "mean_merge", "product_regmean_merge",
                     "refactor_low_rank", "regmean_merge", "regmean_solve", "shrink_gram",
                     "task_arithmetic_merge", "ties_merge"), "merge_utils"),
    **dict.fromkeys(("MERGE_METHODS", "MergeMethod", "available_methods", "get_merge_method",
                     "make_params", "merge_adapters", "register_merge_method"), "methods"),
    "ContinualMergeState": "state",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
