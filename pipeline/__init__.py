"""MESAE SDTM pipeline: nightly site exports to CDISC SDTM datasets, orchestrated by Dagster."""

__version__ = "0.1.0"
