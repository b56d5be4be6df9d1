"""Evaluation of trained MetaLM models (digit VQA: zero-shot, k-shot, finetuned)."""
