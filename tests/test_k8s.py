"""Manifests rendered and validated against the KubeRay v1.7.0 CRD schemas shipped with the tests
(tests/fixtures/kuberay/; the package itself never looks there)."""

import copy
from pathlib import Path

import pytest
import yaml

from rayganx.ops import crds, k8s
from rayganx.job import spec as jobspec
from tests.conftest import JOBS, rayganx

K8S = JOBS.parent / "k8s"
CRDS: Path  # the unpacked fixtures (conftest.kuberay_crds), set for every test here


@pytest.fixture(autouse=True)
def _crds(kuberay_crds):
    global CRDS
    CRDS = kuberay_crds
IMAGE = "ghcr.io/example/rayganx:0.1.0"
# How the checked-in RayJobs are made; test_checked_in_rayjobs_are_rendered keeps them so.
RENDERED = {
    "rayjob-dcgan-celeba.yaml": ["jobs/dcgan_celeba.yaml", "--gpus-per-worker", "1", "--set", "scaling.num_workers=4",
                                 "--set", "scaling.cpus_per_worker=7", "--set", "scaling.memory_per_worker=48Gi",
                                 "--set", "train.precision=bf16", "--set", "data.path=s3://my-bucket/celeba",
                                 "--set", "storage.path=s3://my-bucket/runs"],
    "rayjob-tune-dcgan-digits.yaml": ["jobs/tune_dcgan_digits.yaml", "--set", "storage=s3://my-bucket/sweeps",
                                      "--set", "max_concurrent_trials=4", "--set", "num_samples=16"],
}


@pytest.fixture(scope="module")
def schemas(kuberay_crds):
    return crds.from_dir(kuberay_crds)


def docs(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def rayjob():
    return copy.deepcopy(docs(K8S / "rayjob-dcgan-celeba.yaml")[1])


def render(tmp_path, *args, env=None):
    out = tmp_path / "rendered.yaml"
    r = rayganx("k8s", "render", *args, "--out", out, env={"RAYGANX_KUBERAY_CRDS": str(CRDS), **(env or {})})
    return r, (docs(out) if r.returncode == 0 else None)


def worker_group(job):
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def test_checked_in_manifests_are_valid(schemas):
    files = sorted(K8S.glob("*.yaml"))
    assert {f.name for f in files} >= {"raycluster-gpu.yaml", "raycluster-cpu.yaml", "rayjob-dcgan-celeba.yaml",
                                        "secret-example.yaml", "kustomization.yaml"}
    for f in files:
        assert k8s.validate_file(f, schemas) == [], f
    r = rayganx("k8s", "validate", *files, "--crds", CRDS)
    assert r.returncode == 0, r.stderr
    gpu = docs(K8S / "raycluster-gpu.yaml")[0]["spec"]
    worker = gpu["workerGroupSpecs"][0]
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["enableInTreeAutoscaling"] and worker["maxReplicas"] > worker["minReplicas"]


def test_checked_in_rayjobs_are_rendered(tmp_path):
    for name, args in RENDERED.items():
        r, rendered = render(tmp_path, *args, "--image", IMAGE)
        assert r.returncode == 0, r.stderr
        assert rendered == docs(K8S / name), f"k8s/{name} differs from: rayganx k8s render {' '.join(args)}"


def test_set_values_reach_the_configmap_and_size_the_cluster(tmp_path):
    r, (cm, job) = render(tmp_path, JOBS / "dcgan_celeba.yaml", "--image", "reg/rayganx:1", "--namespace", "gans",
                          "--set", "scaling.num_workers=8", "--set", "train.epochs=null", "--set", "train.steps=7",
                          "--set", "data.path=s3://bucket/celeba-new", "--set", "storage.path=s3://bucket/runs",
                          "--set", "scaling.memory_per_worker=6Gi")
    assert r.returncode == 0, r.stderr
    assert "not checked against the KubeRay CRD schemas" not in r.stderr
    assert cm["kind"] == "ConfigMap" and job["metadata"]["namespace"] == "gans"
    shipped = jobspec.from_dict(yaml.safe_load(cm["data"]["job.yaml"]))
    assert (shipped.name, shipped.scaling.num_workers, shipped.train.steps, shipped.train.epochs) == \
        ("dcgan_celeba", 8, 7, None)
    assert (shipped.data.path, shipped.storage.path) == ("s3://bucket/celeba-new", "s3://bucket/runs")
    group = worker_group(job)
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 8
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    # One CPU beyond the Train worker's, for Ray Data's tasks; no GPU asked for a CPU job.
    assert limits == {"cpu": "2", "memory": "6Gi"}
    assert job["spec"]["entrypoint"] == "rayganx run /etc/rayganx/job.yaml"
    assert group["template"]["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "rayganx-storage"}}]


def test_placeholders_stay_for_the_pod_with_the_value_checked_here(tmp_path):
    r, (cm, job) = render(tmp_path, JOBS / "dcgan_celeba.yaml", "--image", "x", "--set", "storage.path=s3://b/runs",
                          env={"CELEBA_PARQUET": "s3://b/celeba"})
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(cm["data"]["job.yaml"])["data"]["path"] == "${CELEBA_PARQUET:-/data/celeba64}"
    for c in (job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0],
              worker_group(job)["template"]["spec"]["containers"][0]):
        assert c["env"] == [{"name": "CELEBA_PARQUET", "value": "s3://b/celeba"}]


def test_pod_local_storage_and_local_data_are_refused(tmp_path):
    r, _ = render(tmp_path, JOBS / "dcgan_celeba.yaml", "--image", "x", env={"CELEBA_PARQUET": str(tmp_path)})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith("error: storage.path: 'runs' is pod-local: on a cluster of 3 pods")
    assert lines[1].startswith(f"error: data.path: '{tmp_path}' is a path on this machine, not in the pods")
    # A shared volume the user names makes both fine, and the render declares it in every pod.
    r, (cm, job) = render(tmp_path, JOBS / "dcgan_celeba.yaml", "--image", "x", "--pvc", "gan-data:/mnt/gan",
                          "--set", "storage.path=/mnt/gan/runs", "--set", "data.path=/mnt/gan/celeba")
    assert r.returncode == 0, r.stderr
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    for pod in (head, worker_group(job)["template"]["spec"]):
        assert {"name": "pvc", "persistentVolumeClaim": {"claimName": "gan-data"}} in pod["volumes"]
        assert {"name": "pvc", "mountPath": "/mnt/gan"} in pod["containers"][0]["volumeMounts"]
    r, _ = render(tmp_path, JOBS / "dcgan_digits.yaml", "--image", "x", "--pvc", "gan-data:/mnt/gan",
                  "--set", "storage.path=/elsewhere/runs")
    assert r.returncode == 1 and "storage.path: '/elsewhere/runs' is pod-local" in r.stderr
    r, _ = render(tmp_path, JOBS / "dcgan_digits.yaml", "--image", "x", "--pvc", "Bad_Claim")
    assert r.returncode == 1 and "expected CLAIM:/mount/path" in r.stderr


def test_fractional_gpus(tmp_path):
    base = [JOBS / "dcgan_digits.yaml", "--image", "x", "--set", "storage.path=s3://b/runs",
            "--set", "scaling.num_workers=4", "--set", "scaling.memory_per_worker=4Gi"]
    # 1/k of a GPU: k workers share one pod and its one GPU (Kubernetes hands out whole GPUs).
    r, (cm, job) = render(tmp_path, *base, "--gpus-per-worker", "0.5")
    assert r.returncode == 0, r.stderr
    group = worker_group(job)
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert group["replicas"] == 2 and limits == {"cpu": "3", "memory": "8Gi", "nvidia.com/gpu": 1}
    shipped = yaml.safe_load(cm["data"]["job.yaml"])["scaling"]
    assert shipped["use_gpu"] is True and shipped["gpus_per_worker"] == 0.5 and shipped["num_workers"] == 4
    r, (_, job) = render(tmp_path, *base, "--set", "scaling.use_gpu=true", "--set", "scaling.gpus_per_worker=2")
    assert r.returncode == 0 and worker_group(job)["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == 2
    for bad in ("0.3", "1.5"):
        r, _ = render(tmp_path, *base, "--gpus-per-worker", bad)
        assert r.returncode == 1 and f"scaling.gpus_per_worker: {bad} cannot be rendered" in r.stderr, r.stderr


def test_rendered_sweep_runs_rayganx_tune_on_a_cluster_sized_for_its_trials(tmp_path):
    from rayganx.sweeps import sweep

    r, (cm, job) = render(tmp_path, JOBS / "tune_dcgan_digits.yaml", "--image", "reg/rayganx:1",
                          "--set", "max_concurrent_trials=3", "--set", "storage=s3://bucket/sweeps")
    assert r.returncode == 0, r.stderr
    sweep = sweep.from_dict(yaml.safe_load(cm["data"]["sweep.yaml"]))  # the base job travels inline
    assert sweep.base.name == "dcgan_digits" and sweep.storage == "s3://bucket/sweeps"
    assert job["spec"]["entrypoint"] == "rayganx tune /etc/rayganx/sweep.yaml"
    assert worker_group(job)["replicas"] == 3 * sweep.workers_per_trial == 3
    r, _ = render(tmp_path, JOBS / "tune_dcgan_digits.yaml", "--image", "reg/rayganx:1")
    assert r.returncode == 1 and "storage.path: 'runs' is pod-local" in r.stderr


def test_schema_sources_and_the_no_schemas_exit_code(tmp_path):
    manifest = K8S / "rayjob-dcgan-celeba.yaml"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")  # kubectl there, but no context
    bare = {"RAYGANX_KUBERAY_CRDS": "", "XDG_CACHE_HOME": str(tmp_path / "cache"), "KUBECONFIG": str(kubeconfig)}
    r = rayganx("k8s", "validate", manifest, env=bare)
    assert r.returncode == crds.EXIT_NO_SCHEMAS == 3, r.stderr
    assert r.stderr.startswith("error: no KubeRay CRD schemas to validate against") and "rayganx k8s crds --from" in r.stderr
    r = rayganx("k8s", "validate", manifest, "--server", env=bare)
    assert r.returncode == 1 and "--server: needs kubectl and a current kube context" in r.stderr
    r = rayganx("k8s", "validate", manifest, env={**bare, "RAYGANX_KUBERAY_CRDS": str(tmp_path)})
    assert r.returncode == 1 and "RAYGANX_KUBERAY_CRDS:" in r.stderr and "no RayCluster or RayJob" in r.stderr
    # Cached once, found from then on.
    r = rayganx("k8s", "crds", "--from", CRDS / "ray.io_rayjobs.yaml", "--from", CRDS / "ray.io_rayclusters.yaml",
                env=bare)
    assert r.returncode == 0 and "cached the RayCluster and RayJob CRDs" in r.stdout, r.stderr
    r = rayganx("k8s", "validate", manifest, env=bare)
    assert r.returncode == 0 and "KubeRay CRDs from " + str(tmp_path / "cache") in r.stdout, r.stdout + r.stderr
    r = rayganx("k8s", "crds", "--from", JOBS / "dcgan_digits.yaml", env=bare)
    assert r.returncode == 1 and "no RayJob or RayCluster CustomResourceDefinition found" in r.stderr


def test_pod_templates_are_checked_against_the_kubernetes_core_schema(schemas):
    doc = rayjob()
    container = worker_group(doc)["template"]["spec"]["containers"][0]
    container["imagePullPolicyy"] = "Always"
    problems = k8s.validate_doc(doc, "x.yaml", schemas)
    assert any("spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0: unknown field "
               "'imagePullPolicyy'" in p and "Pod schema" in p for p in problems), problems
    doc = rayjob()
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0][
        "containerPort"] = "gcs"
    problems = k8s.validate_doc(doc, "x.yaml", schemas)
    assert any("headGroupSpec.template.spec.containers.0.ports.0.containerPort" in p for p in problems), problems


def test_misspelt_field_and_wrong_type_are_named(schemas):
    doc = rayjob()
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")
    problems = k8s.validate_doc(doc, "x.yaml", schemas)
    assert any("spec: unknown field 'shutdownAfterJobFinish'" in p for p in problems), problems
    doc = rayjob()
    worker_group(doc)["replicas"] = "four"
    problems = k8s.validate_doc(doc, "x.yaml", schemas)
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
    worker_group(doc)["template"]["spec"]["containers"][0]["env"] = [
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}]
    path = tmp_path / "leak.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = rayganx("k8s", "validate", path, "--crds", CRDS)
    assert r.returncode == 1
    assert "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.env.0: AWS_SECRET_ACCESS_KEY has an " \
           "inline value" in r.stderr and "hunter2" not in r.stderr


def test_a_malformed_crd_file_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "ray.io_rayjobs.yaml"
    bad.write_text("apiVersion: apiextensions.k8s.io/v1\nkind: [CustomResourceDefinition\n")
    with pytest.raises(crds.CrdError, match=r"ray.io_rayjobs.yaml: malformed YAML: while parsing a flow sequence"):
        crds.from_dir(bad)
