"""The HTTP service `cdd-serve`: app, engine, executor, batching scheduler, adapter pool, CUDA graphs, settings,
metrics, logs and the Ray Serve deployment. It imports the diffusion library (`cdd.runtime.diffusion`)."""
