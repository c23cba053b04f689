"""Running a graph: the node runtime, the graph table, the launcher that supervises the nodes,
preflight checks, resume state and live-mode settings.
"""
