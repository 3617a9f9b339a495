"""TensorRT support: optimization profiles, the Polygraphy loader chain, the timing cache.

Nothing here imports TensorRT at module level; profiles and the loader chain are built and
inspected without it. Only calling the chain (a build) needs TensorRT and a GPU.
"""
