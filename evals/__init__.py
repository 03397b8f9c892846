"""Evaluations: message-edit replay, debug-gym mini_nightmare, output consistency."""
