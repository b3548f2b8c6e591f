"""Estimator layer: the EM loop and the scikit-learn / hmmlearn style estimators built on the
model math (``emflow.models``), the execution layer and the storage layer."""
