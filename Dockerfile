# rayganx image for KubeRay and Ray clusters: Ray's official image of the pinned Ray version with
# rayganx and the exact versions it was tested with (docker/requirements.lock).
#   docker build -t REGISTRY/rayganx:0.1.0 . && docker push REGISTRY/rayganx:0.1.0
# The -gpu tag brings CUDA. torch is not in the lock: the base image's CUDA build is kept, and
# installed here (the registry's default CUDA wheel of the tested version) only where it has none.
FROM rayproject/ray:2.60.0-py311-gpu
WORKDIR /app
COPY --chown=ray:users docker/requirements.lock ./requirements.lock
RUN pip install --no-cache-dir --no-deps -r requirements.lock \
 && (python -c "import torch" 2>/dev/null || pip install --no-cache-dir "torch==2.13.0")
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users rayganx ./rayganx
COPY --chown=ray:users jobs ./jobs
RUN pip install --no-cache-dir --no-deps .
# Build check: the CLI starts, a job validates, a manifest renders with nothing beside the package,
# and what `rayganx k8s validate` needs imports.
RUN rayganx --version \
 && rayganx validate jobs/dcgan_digits.yaml > /dev/null \
 && rayganx k8s render jobs/dcgan_digits.yaml --image check --set storage.path=s3://bucket/runs > /dev/null \
 && python -c "import jsonschema, kubernetes_validate, s3fs, gcsfs, torch, ray; assert ray.__version__ == '2.60.0'"
