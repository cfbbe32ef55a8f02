"""Optimizer parameter groups and LR schedules."""
