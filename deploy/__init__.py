"""Deployment files that are code: the KubeRay manifest generator (deploy/kuberay/generate.py)."""
