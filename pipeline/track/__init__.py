"""Tracking: prompts, the Kalman-filtered prompt tracker, measurement and exclusive masks."""
