"""Config files, job and sweep alike: YAML read with line numbers in its errors, `--set key=value`
overrides, ${VAR} placeholders from the environment (never a credential), and pydantic errors
turned into 'dotted.key: what was expected' lines with the closest valid key.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from rayganx.job.errors import UserError

# Environment variables that hold credentials. A job file may not reference them: their values
# would end up in spec.yaml, checkpoints and logs. Credentials reach fsspec/botocore from the
# environment, a profile or an instance role (and on Kubernetes from a Secret).
SECRET_ENV = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?|API_KEY)", re.I)
ENV_REF = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


class SpecError(UserError, ValueError):
    """A job spec problem, already phrased for the user (file, key, what was expected)."""


def _keys_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys of the section a pydantic error location points into."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def job_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every settable dotted key of a config (train.optim_g.lr, ...)."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += job_keys(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def describe_error(err: dict, model: type[BaseModel]) -> str:
    """One pydantic error as 'dotted.key: what was expected, got what'."""
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        valid = _keys_at(model, loc)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
        return f"{key}: unknown key ({hint})"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    msg = err["msg"].replace("Input should be", "expected").replace("String should", "expected to")
    return f"{key}: {msg}, got {err.get('input')!r}"


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise SpecError(f"--set {dotted}: '{p}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(value) if value.strip() else None))
    return out


def expand_env(obj: Any, templates: dict[str, str] | None = None, where: str = "") -> Any:
    """${VAR} and ${VAR:-default} in string values, so a path can come from the environment.

    The strings as written are recorded in `templates` by dotted key. Credential variables are
    refused: a job file is stored, printed and shipped, and must never carry a secret."""
    if isinstance(obj, dict):
        return {k: expand_env(v, templates, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [expand_env(v, None, where) for v in obj]
    if isinstance(obj, str):
        refs = ENV_REF.findall(obj)
        for var, _ in refs:
            if SECRET_ENV.search(var):
                raise SpecError(f"{where or 'value'}: ${{{var}}} looks like a credential; credentials are read "
                                f"from the environment, a profile or an instance role, never from the job file")
        if not refs:
            return obj
        if templates is not None:
            templates[where] = obj
        return ENV_REF.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), obj)
    return obj


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such job file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{path}:{where}: malformed YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return raw
