"""Validation in three layers, each a set of Pandera checks with stable rule ids:

- `raw_contract`: the transfer spec, record by record (ERROR holds the record back);
- `protocol_ranges`: the registry's eligibility and conduct rules (WARNING, record mapped);
- `sdtm_conformance`: our own SDTM outputs (blocking asset checks: a failure is our bug).
"""
