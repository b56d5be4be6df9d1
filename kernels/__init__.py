"""Triton kernels and their launchers, one op per file (installed as metalm_fast.kernels).

No autograd and no validation here: raw, fast, documented math. Callers (the
ops layer) validate inputs first. Importing this package does not import
Triton; each op module does, so a machine without Triton can still import
metalm_fast.
"""
