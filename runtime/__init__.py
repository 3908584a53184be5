"""Backbone, schedule, samplers, conditioned denoiser, adapter pool, serving."""
