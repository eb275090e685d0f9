"""Job spec validation: every kind of bad input names the file, the key and what was expected."""

import pytest

from rayganx.job import spec as jobspec
from tests.conftest import JOBS, rayganx


def load_text(tmp_path, text, overrides=None):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return jobspec.load(p, overrides), p


def error_of(tmp_path, text, overrides=None) -> str:
    with pytest.raises(jobspec.SpecError) as e:
        load_text(tmp_path, text, overrides)
    return str(e.value)


def test_every_shipped_job_validates():
    jobs = sorted(JOBS.glob("*.yaml"))
    assert jobs
    for path in jobs:
        if path.name.startswith(("tune_", "pbt_")):
            continue  # sweeps, validated in test_tune
        spec = jobspec.load(path)
        assert spec.name


def test_misspelt_key_suggests_the_closest(tmp_path):
    msg = error_of(tmp_path, "name: x\ntrain: {steps: 5, batch_sise: 32}\n")
    assert "job.yaml" in msg and "train.batch_sise" in msg and "did you mean 'batch_size'" in msg


def test_unknown_top_level_section(tmp_path):
    msg = error_of(tmp_path, "name: x\ntrain: {steps: 5}\nscalling: {num_workers: 2}\n")
    assert "scalling: unknown key (did you mean 'scaling'?)" in msg


def test_wrong_type_names_key_and_expectation(tmp_path):
    msg = error_of(tmp_path, "name: x\ntrain: {steps: many}\n")
    assert "train.steps" in msg and "integer" in msg and "'many'" in msg


def test_impossible_values(tmp_path):
    assert "train.d_steps" in error_of(tmp_path, "name: x\ntrain: {steps: 5, d_steps: 0}\n")
    msg = error_of(tmp_path, "name: x\ntrain: {steps: 5, batch_size: 63}\nscaling: {num_workers: 2}\n")
    assert "train.batch_size: 63 does not split evenly" in msg
    msg = error_of(tmp_path, "name: x\nmodel: {kind: dcgan}\ndata: {image_size: 48}\ntrain: {steps: 5}\n")
    assert "data.image_size: dcgan produces 32 or 64 px images, got 48" in msg
    assert "model.kind" in error_of(tmp_path, "name: x\nmodel: {kind: stylegan9}\ntrain: {steps: 5}\n")
    assert "set exactly one" in error_of(tmp_path, "name: x\ntrain: {steps: 5, epochs: 2}\n")
    assert "data.path: required" in error_of(tmp_path, "name: x\ndata: {source: parquet}\ntrain: {steps: 5}\n")
    # numpy's generators refuse negative seeds: caught here, not in every worker
    assert "train.seed: expected greater than or equal to 0" in error_of(tmp_path, "name: x\ntrain: {steps: 5, seed: -1}\n")


def test_malformed_yaml_reports_the_line(tmp_path):
    msg = error_of(tmp_path, "name: x\ntrain:\n  steps: 5\n  batch_size: [1, 2\n")
    assert "job.yaml" in msg and "line" in msg and "malformed YAML" in msg


def test_missing_file():
    with pytest.raises(jobspec.SpecError, match="no such job file"):
        jobspec.load("/nonexistent/job.yaml")


def test_overrides_and_env_placeholders(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_DATA", "/somewhere/celeba")
    spec, _ = load_text(tmp_path, "name: x\ndata: {source: celeba, path: '${MY_DATA}', image_size: 64}\n"
                                  "train: {steps: 5}\n", ["train.steps=9", "train.optim_g.lr=0.001"])
    assert spec.train.steps == 9 and spec.train.optim_g.lr == 0.001 and spec.data.path == "/somewhere/celeba"
    msg = error_of(tmp_path, "name: x\ntrain: {steps: 5}\n", ["train.stepz=3"])
    assert "train.stepz: unknown key (did you mean 'steps'?)" in msg


def test_validate_cli_prints_resolved_spec(tmp_path):
    r = rayganx("validate", JOBS / "dcgan_digits.yaml", "--set", "train.steps=7")
    assert r.returncode == 0, r.stderr
    resolved = jobspec.from_dict(__import__("yaml").safe_load(r.stdout))
    assert resolved.train.steps == 7 and resolved.train.optim_d.betas == (0.5, 0.999)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: {steps: 5, lr: 3}\n")
    r = rayganx("validate", bad)
    assert r.returncode == 1 and "train.lr: unknown key" in r.stderr and "Traceback" not in r.stderr


def test_job_reference_documents_every_key():
    from pydantic import BaseModel

    text = (JOBS.parent / "docs" / "jobs.md").read_text()
    for section, field in jobspec.JobSpec.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            for key in ann.model_fields:
                assert f"`{section}.{key}`" in text, f"docs/jobs.md lacks {section}.{key}"
