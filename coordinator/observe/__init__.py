"""Watching a job: the live dashboard and Prometheus ``/metrics`` (``dashboard.py``), what they show
(``fleet.py``, ``metrics.py``) and the TensorBoard log (``tensorboard.py``), all fed by the
coordinator's progress events."""
