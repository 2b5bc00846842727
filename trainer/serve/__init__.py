"""Serving a trained model: the loadable bundle (bundle.py), its MLflow pyfunc (pyfunc.py) and the
model registry (registry.py). May import evaluation, components and below."""
