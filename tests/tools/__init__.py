"""Tests of metalm_fast.tools (developer tools)."""
