"""The steps a move would take, as a dry run records them (no master is called)."""

from __future__ import annotations

from exporter.failover.moves import MoveRequest
from exporter.failover.records import PlannedStep


def planned_steps(req: MoveRequest, order: list[str], pre_hook_url: str | None,
                  checkpoint_ts: float | None) -> list[PlannedStep]:
    """The steps of ``req`` in execution order; ``order`` is the candidates it would try."""
    plan: list[PlannedStep] = [
        {"step": "select", "status": "planned", "detail": {"order": order}}]
    if pre_hook_url is not None:
        plan.append({"step": "pre_hook", "status": "planned", "detail": {"url": pre_hook_url}})
    if req.kind == "failover":
        plan.append({"step": "fence", "status": "planned", "detail": {"master": req.master}})
    plan += [
        {"step": "fetch", "status": "planned",
         "detail": {"from": req.source, "fallback_checkpoint_ts": checkpoint_ts}},
        {"step": "import", "status": "planned", "backup": order[0] if order else None},
        {"step": "verify", "status": "planned"},
        {"step": "activate", "status": "planned", "detail": {"duties": list(req.duties)}},
        {"step": "routing", "status": "planned"},
    ]
    if req.kind != "failover":
        plan.append({"step": "release", "status": "planned", "detail": {"master": req.source}})
    return plan
