# The image every raymoe pod runs: the Ray head, the front and the expert workers, and KubeRay's
# autoscaler sidecar (which reuses the head's image). The manifests in k8s/ name it.
#
#   docker build -t raymoe:0.1.0 .                                                   # CPU torch
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#                -t raymoe:0.1.0-cuda .                                              # CUDA torch
#
# raymoe is installed as a package (not mounted, not a runtime_env): Serve's gRPC proxy imports
# the generated stubs (raymoe.protos.generator_pb2_grpc) on every node, and expert actors import
# raymoe.actors / raymoe.model on nodes that never ran the app's code.
FROM python:3.11-slim

# KubeRay's injected probes and its wait-for-GCS init container run bash and wget.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAYMOE_CACHE=/opt/raymoe/cache

# torch first, in its own layer (the biggest one): the CPU build by default, a CUDA build with
# TORCH_INDEX (its wheels bring the CUDA runtime; the node's driver comes from the GPU runtime).
# TORCH_VERSION must equal the pin in pyproject.toml (tests/test_k8s.py checks).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# The other dependencies, read from pyproject.toml (one list, cached until it changes);
# torch==2.13.0 is already met by the build above (2.13.0+cpu / +cuXXX).
COPY pyproject.toml /tmp/raymoe/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/raymoe/pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/raymoe/requirements.txt \
 && pip install -r /tmp/raymoe/requirements.txt

# raymoe itself (protos, model, actors, cluster, and the demo model as package data).
COPY . /tmp/raymoe/src
RUN pip install --no-deps /tmp/raymoe/src && rm -rf /tmp/raymoe

# Fail the build, not the pods, if the stubs or the app do not import; and fix the default model
# (checkpoint: null) at one path in the image, identical on every pod: the shipped demo model,
# or else a `tiny` checkpoint created here once under $RAYMOE_CACHE.
RUN mkdir -p "${RAYMOE_CACHE}" \
 && python -c "import raymoe.protos.generator_pb2_grpc, grpc_health.v1.health_pb2_grpc, raymoe.cluster.app, raymoe.actors.pool; \
from raymoe.model.default import default_checkpoint; print('default model:', default_checkpoint())" \
 && chmod -R a+rX /opt/raymoe

# Ray needs no root; /tmp/ray (logs, sockets) and $HOME are writable for this user.
RUN useradd --create-home --uid 1000 ray
USER 1000
WORKDIR /home/ray
