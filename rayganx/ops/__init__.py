"""Operations: clusters, Kubernetes, dashboards and run comparison.

`remote` (the Ray Jobs API), `k8s` and `crds` (KubeRay manifests and the schemas they are
checked against), `grafana`, `monitor` (`rayganx tb`), `compare` (runs side by side).

May import: job, store.
"""
