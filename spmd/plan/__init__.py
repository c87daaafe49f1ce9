"""The layout planner: which layouts (tp or dpa groups, pipeline stages, replicas) of a model fit given GPUs,
their memory per GPU and predicted decode speed (``python -m spmd.plan``; ``spmd.plan.memory.check`` before
loading). Imports only spmd.config and the standard library: it runs on a login node in well under a second."""
