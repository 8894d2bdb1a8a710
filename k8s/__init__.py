"""Kubernetes (KubeRay) manifests for raymoe; `python -m k8s.render` writes their Serve configs."""
