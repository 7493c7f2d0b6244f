"""CROPI's math: advantages, off-policy gradients, sparse projection, scoring, rollout store.

Nothing in this package imports OpenRLHF; the integration layer adapts OpenRLHF to it.
"""
