"""Dagster assets by layer: raw ingest -> validated -> sdtm -> reports."""
