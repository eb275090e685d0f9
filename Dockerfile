# rayganx image for KubeRay: Ray's official image of the pinned Ray version, rayganx installed.
#   docker build -t REGISTRY/rayganx:0.1.0 . && docker push REGISTRY/rayganx:0.1.0
# The -gpu tag brings CUDA; the base image's torch is kept where it satisfies rayganx's range.
FROM rayproject/ray:2.60.0-py311-gpu
WORKDIR /app
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users rayganx ./rayganx
COPY --chown=ray:users jobs ./jobs
RUN pip install --no-cache-dir ".[s3,gcs,optuna]"
