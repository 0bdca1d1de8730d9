"""Evaluators and text sampling."""
