"""Failover: move a failed master's duties and state to the best backup, once.

``manager.FailoverManager`` is the entry point; its module docstring maps the other parts.
"""
