"""Manifests validated offline against the KubeRay v1.7.0 CRD schemas in ../shared/kuberay/."""

import copy
from pathlib import Path

import pytest
import yaml

from rayganx import k8s, spec as jobspec
from tests.conftest import JOBS, rayganx

K8S = JOBS.parent / "k8s"
pytestmark = pytest.mark.skipif(k8s.find_crds() is None, reason="KubeRay CRD schemas not found in "
                                + ", ".join(str(d) for d in k8s.crd_dirs()) + " (set RAYGANX_KUBERAY_CRDS)")


def docs(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def rayjob():
    return copy.deepcopy(docs(K8S / "rayjob-dcgan-celeba.yaml")[0])


def test_checked_in_manifests_are_valid():
    files = sorted(K8S.glob("*.yaml"))
    assert {f.name for f in files} >= {"raycluster-gpu.yaml", "raycluster-cpu.yaml", "rayjob-dcgan-celeba.yaml",
                                        "secret-example.yaml", "kustomization.yaml"}
    for f in files:
        assert k8s.validate_file(f) == [], f
    r = rayganx("k8s", "validate", *files)
    assert r.returncode == 0, r.stderr
    gpu = docs(K8S / "raycluster-gpu.yaml")[0]["spec"]
    worker = gpu["workerGroupSpecs"][0]
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["enableInTreeAutoscaling"] and worker["maxReplicas"] > worker["minReplicas"]


def test_rendered_manifest_is_valid_and_sized_from_the_spec(tmp_path):
    out = tmp_path / "job.yaml"
    r = rayganx("k8s", "render", JOBS / "dcgan_celeba.yaml", "--image", "reg/rayganx:1", "--gpus-per-worker", "1",
                "--namespace", "gans", "--set", "scaling.num_workers=4", "--out", out)
    assert r.returncode == 0, r.stderr
    cm, job = docs(out)
    assert k8s.validate_file(out) == []
    assert cm["kind"] == "ConfigMap" and jobspec.from_dict(yaml.safe_load(cm["data"]["job.yaml"])).name == "dcgan_celeba"
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == 4 and job["metadata"]["namespace"] == "gans"
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    # One CPU beyond the Train worker's, for Ray Data's tasks.
    assert limits["nvidia.com/gpu"] == 1 and limits["cpu"] == "2"
    assert "scaling.use_gpu=true" in job["spec"]["entrypoint"]
    assert group["template"]["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "rayganx-storage"}}]


def test_rendered_sweep_runs_rayganx_tune_on_a_cluster_sized_for_its_trials(tmp_path):
    from rayganx import tune

    out = tmp_path / "sweep.yaml"
    r = rayganx("k8s", "render", JOBS / "tune_dcgan_digits.yaml", "--image", "reg/rayganx:1",
                "--set", "max_concurrent_trials=3", "--set", "storage=s3://bucket/sweeps", "--out", out)
    assert r.returncode == 0, r.stderr
    assert k8s.validate_file(out) == []
    cm, job = docs(out)
    sweep = tune.from_dict(yaml.safe_load(cm["data"]["sweep.yaml"]))  # the base job travels inline
    assert sweep.base.name == "dcgan_digits" and sweep.storage == "s3://bucket/sweeps"
    assert job["spec"]["entrypoint"] == "rayganx tune /etc/rayganx/sweep.yaml"
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == 3 * sweep.workers_per_trial == 3
    assert group["template"]["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "rayganx-storage"}}]


def test_pod_templates_are_checked_against_the_kubernetes_core_schema():
    doc = rayjob()
    container = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["imagePullPolicyy"] = "Always"
    problems = k8s.validate_doc(doc, "x.yaml")
    assert any("spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0: unknown field "
               "'imagePullPolicyy'" in p and "Pod schema" in p for p in problems), problems
    doc = rayjob()
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0][
        "containerPort"] = "gcs"
    problems = k8s.validate_doc(doc, "x.yaml")
    assert any("headGroupSpec.template.spec.containers.0.ports.0.containerPort" in p for p in problems), problems


def test_misspelt_field_and_wrong_type_are_named():
    doc = rayjob()
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")
    problems = k8s.validate_doc(doc, "x.yaml")
    assert any("spec: unknown field 'shutdownAfterJobFinish'" in p for p in problems), problems
    doc = rayjob()
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "four"
    problems = k8s.validate_doc(doc, "x.yaml")
    assert any("spec.rayClusterSpec.workerGroupSpecs.0.replicas" in p and "'four'" in p for p in problems), problems


def test_cluster_spec_and_selector_exactly_one():
    both = rayjob()
    both["spec"]["clusterSelector"] = {"ray.io/cluster": "rayganx"}
    neither = rayjob()
    del neither["spec"]["rayClusterSpec"]
    for doc in (both, neither):
        assert "x.yaml: spec: set exactly one of rayClusterSpec and clusterSelector" in k8s.validate_doc(doc, "x.yaml")
    ttl = rayjob()
    ttl["spec"]["shutdownAfterJobFinishes"] = False
    assert any("ttlSecondsAfterFinished" in p for p in k8s.validate_doc(ttl, "x.yaml"))
    mode = rayjob()
    mode["spec"]["submissionMode"] = "K8sJob"
    assert any("spec.submissionMode: expected one of" in p for p in k8s.validate_doc(mode, "x.yaml"))


def test_inlined_secret_value_fails_naming_the_field(tmp_path):
    doc = rayjob()
    env = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    env[0] = {"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}
    path = tmp_path / "leak.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = rayganx("k8s", "validate", path)
    assert r.returncode == 1
    assert "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.env.0: AWS_SECRET_ACCESS_KEY has an " \
           "inline value" in r.stderr and "hunter2" not in r.stderr
