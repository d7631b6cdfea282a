"""Exact global-budget solver: per-query convex hulls, λ* by radix select, certificates.

In memory: ``hull_steps`` -> ``solve_budget`` (or ``solve_tenant_budgets``,
``solve_with_model_caps``); online: ``choose_arm`` with the certificate's λ*, tie_cut and seed.
Over Ray Data blocks: step tables (``r2ray.solver.table``) -> ``solve_dataset``.
"""
from r2ray.solver.blocks import DEFER_ARM, tie_hash, with_defer_arm
from r2ray.solver.budget import (
    DualCertificate, InfeasibleBudget, SolveResult, choose_arm, choose_arms, solve_budget,
    solve_groups)
from r2ray.solver.distributed import DatasetSolveResult, solve_dataset, steps_dataset
from r2ray.solver.extensions import (
    CapCertificate, CappedSolveResult, ModelCap, solve_tenant_budgets, solve_with_model_caps)
from r2ray.solver.hull import NO_ARM, HullSteps, concat_steps, efficiency_key, hull_steps
from r2ray.solver.table import (
    STEP_SCHEMA, ChosenOnChain, chosen_on_chain, hull_values, step_columns, steps_to_table,
    table_to_steps)

__all__ = [
    "DEFER_ARM", "NO_ARM", "STEP_SCHEMA", "CapCertificate", "CappedSolveResult", "ChosenOnChain",
    "chosen_on_chain", "hull_values", "step_columns",
    "DatasetSolveResult", "DualCertificate", "HullSteps", "InfeasibleBudget", "ModelCap",
    "SolveResult", "choose_arm", "choose_arms", "concat_steps", "efficiency_key", "hull_steps",
    "solve_budget", "solve_dataset", "solve_groups", "solve_tenant_budgets",
    "solve_with_model_caps", "steps_dataset", "steps_to_table", "table_to_steps", "tie_hash",
    "with_defer_arm",
]
