"""Observability: Prometheus config and alert rules, Grafana provisioning, the GPU exporter.

The YAML and JSON files beside this module are read by Prometheus, Alertmanager
and Grafana; the tests (``tests/support/promql.py``) compare the metric names they
use with what the services really export.
"""
