"""The diffusion library: backbone loading, noise schedule, samplers, the conditioned denoiser, text encoders
and the backbone factory. Training, evaluation and the serving half import it; it imports nothing from
`cdd.runtime.serving`."""
