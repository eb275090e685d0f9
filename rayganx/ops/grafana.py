"""A Grafana dashboard for rayganx's Ray custom metrics, in the shape of Ray's own dashboards
(a `datasource` variable for the Prometheus that scrapes the Ray nodes, a `SessionName`
filter), with job and rank filters. Provision it in the Grafana the Ray dashboard uses.

Ray prefixes custom metrics with `ray_`; every rayganx series carries the tags job and rank.
"""

from __future__ import annotations

import json
import re

from rayganx.job.sections import GAN_KINDS

UID = "rayganx"
FILTER = 'job=~"$job", rank=~"$rank", SessionName=~"$SessionName"'

# title, unit, description, [(PromQL, legend)]
PANELS = [
    ("Losses", "none", "Discriminator and generator losses (GANs), or the loss of a CNN/VAE, averaged over "
     "workers since the last log step.",
     [(f"ray_rayganx_loss_d{{{FILTER}}}", "{{job}} loss_d (rank {{rank}})"),
      (f"ray_rayganx_loss_g{{{FILTER}}}", "{{job}} loss_g (rank {{rank}})"),
      (f"ray_rayganx_loss{{{FILTER}}}", "{{job}} loss (rank {{rank}})")]),
    ("Images/s", "none", "Real images consumed per second across all workers.",
     [(f"ray_rayganx_images_per_s{{{FILTER}}}", "{{job}} (rank {{rank}})")]),
    ("Step time", "s", "Seconds per training step over the last log interval.",
     [(f"ray_rayganx_step_time{{{FILTER}}}", "{{job}} (rank {{rank}})")]),
    ("Step", "none", "The last logged training step (generator steps for GANs).",
     [(f"ray_rayganx_step{{{FILTER}}}", "{{job}} (rank {{rank}})")]),
    ("FID / KID", "none", "The latest evaluation scores (jobs with eval.every); rank 0 reports them.",
     [(f"ray_rayganx_fid{{{FILTER}}}", "{{job}} FID"),
      (f"ray_rayganx_kid{{{FILTER}}}", "{{job}} KID")]),
    ("Checkpoint age", "s", "Seconds since the last checkpoint was written: a stalled run grows here.",
     [(f"time() - ray_rayganx_last_checkpoint_time{{{FILTER}}}", "{{job}} (rank {{rank}})")]),
    ("Rollbacks", "none", "Divergence rollbacks in the current attempt (train.max_rollbacks ends the run).",
     [(f"ray_rayganx_rollbacks{{{FILTER}}}", "{{job}} (rank {{rank}})")]),
]


# Series only some model kinds export; a panel shows the ones the job has.
_GANS = set(GAN_KINDS)
ONLY_FOR = {"ray_rayganx_loss": {"cnn", "vae"}, "ray_rayganx_loss_d": _GANS, "ray_rayganx_loss_g": _GANS,
            "ray_rayganx_fid": _GANS | {"vae"}, "ray_rayganx_kid": _GANS | {"vae"}}


def _variable(name: str, query: str, label: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "definition": query, "query": {"query": query, "refId": "StandardVariableQuery"},
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}


def dashboard() -> dict:
    panels = []
    for i, (title, unit, description, targets) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title, "description": description,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 0}},
                            "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
            "targets": [{"expr": expr, "legendFormat": legend, "refId": chr(65 + j),
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                        for j, (expr, legend) in enumerate(targets)],
        })
    return {
        "title": "rayganx training", "uid": UID, "tags": ["ray", "rayganx"], "editable": True,
        "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "hide": 0,
             "label": "Data source", "current": {}},
            _variable("SessionName", "label_values(ray_rayganx_step, SessionName)", "Ray session"),
            _variable("job", 'label_values(ray_rayganx_step{SessionName=~"$SessionName"}, job)', "Job"),
            _variable("rank", 'label_values(ray_rayganx_step{SessionName=~"$SessionName", job=~"$job"}, rank)',
                      "Rank"),
        ]},
        "panels": panels,
    }


def to_json() -> str:
    return json.dumps(dashboard(), indent=1) + "\n"


def queried_metrics(board: dict | None = None, model_kind: str | None = None) -> dict[str, set[str]]:
    """Each metric the dashboard queries (panels and variables), with the labels it filters or
    groups by: what a node's metrics endpoint must export for the dashboard to show anything.
    model_kind: only the metrics a job of that kind exports."""
    board = board or dashboard()
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in board["templating"]["list"] if v.get("type") == "query"]
    out: dict[str, set[str]] = {}
    for expr in exprs:
        for name, selector in re.findall(r"(ray_rayganx_\w+)(\{[^}]*\})?", expr):
            labels = set(re.findall(r"(\w+)\s*=~?", selector or ""))
            labels |= set(re.findall(r"label_values\([^,]+,\s*(\w+)\)", expr))
            out.setdefault(name, set()).update(labels)
    if model_kind:
        out = {k: v for k, v in out.items() if model_kind in ONLY_FOR.get(k, {model_kind})}
    return out
