"""Evaluation: deferral curves on held-out bench data, AUDC / QNC / Peak / cost ratios, reports."""
