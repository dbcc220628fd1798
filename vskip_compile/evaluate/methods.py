"""Method: one row of the eval table (a plan or a token drop, with the budget it was chosen for)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .. import baselines
from ..archs import adapter_for
from ..baselines import TokenDrop
from ..flops import TextDims, model_flops
from ..errors import VSkipError
from ..plan import SkipPlan

METHODS = ("opskip", "shortv", "vtw", "fastv")


class MissingPlanError(VSkipError, FileNotFoundError):
    """A shipped plan the eval needs is not in the plans directory."""


@dataclass
class Method:
    """One row of the table: a plan or a token drop, with the budget it was chosen for."""

    name: str
    family: str  # "full" | "opskip" | "shortv" | "vtw" | "fastv"
    budget: float | None
    plan: SkipPlan | None = None
    drop: TokenDrop | None = None

    @property
    def spec(self) -> SkipPlan | TokenDrop:
        return self.drop if self.drop is not None else self.plan

    def params(self) -> str:
        if self.drop is not None:
            return json.dumps(self.drop.to_dict())
        return str(self.plan) if self.plan is not None else ""

    def flops(self, dims: TextDims, S_value: int, V_value: int) -> int:
        if self.drop is not None:
            return baselines.token_drop_flops(dims, self.drop, S_value, V_value)
        return int(model_flops(dims, self.plan, S_value, V_value))


def build_methods(model, budgets: Sequence[float], plans_dir: Path, families: Sequence[str] = METHODS,
                  S_value: int | None = None, V_value: int | None = None, fastv_layer: int = 2) -> list[Method]:
    """The full model, then per family and budget: the shipped plan (opskip / shortv, from
    `plans_dir/<family>-bXX.json`) or the drop chosen to cut at least the budget at (S, V)."""
    adapter = adapter_for(model)
    L = len(adapter.layers(model))
    dims = TextDims.from_hf_config(model.config)
    methods = [Method("full", "full", None, plan=SkipPlan.full(L))]
    for family in families:
        for b in budgets:
            tag = f"{family}-b{round(100 * b)}"
            if family in ("opskip", "shortv"):
                path = Path(plans_dir) / f"{tag}.json"
                if not path.is_file():
                    raise MissingPlanError(f"no plan {path}: run `vskip calibrate` first")
                plan = SkipPlan.load(path)
                adapter.check_plan(model, plan)
                methods.append(Method(tag, family, b, plan=plan))
            elif family == "vtw":
                methods.append(Method(tag, family, b, drop=baselines.vtw_for_budget(dims, b, S_value, V_value)))
            elif family == "fastv":
                drop = baselines.fastv_for_budget(dims, b, S_value, V_value, layer=fastv_layer)
                methods.append(Method(tag, family, b, drop=drop))
            else:
                raise ValueError(f"unknown method family {family!r}; expected one of {', '.join(METHODS)}")
    return methods


def calibration_seq_len(plans_dir: Path) -> int | None:
    """The calibration layout's S recorded in the shipped opskip plans, if any."""
    for path in sorted(Path(plans_dir).glob("opskip-b*.json")):
        layout = (SkipPlan.load(path).provenance or {}).get("layout") or {}
        if "S" in layout:
            return int(layout["S"])
    return None


def median(xs: Sequence[int]) -> int:
    xs = sorted(xs)
    return xs[len(xs) // 2]
