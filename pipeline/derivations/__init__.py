"""The derivation library: small pure vectorized functions the mappings name.

Every function takes and returns pandas Series (or frames) and never loops over rows in Python;
functions that parse text run once per distinct value (`on_distinct_values`), which makes a
million lab rows with a few thousand distinct dates cheap.
"""
