"""Observability: Prometheus config and alert rules, Grafana provisioning, the GPU exporter.

The YAML and JSON files beside this module are read by Prometheus, Alertmanager
and Grafana; :mod:`observability.promql` lists the metric names they use so the
tests can compare them with what the services really export.
"""
