"""The toolkit's core: loading models (the architecture map, adapters), aligned pairs, generation, the verifiers and
the loop detector, atomic storage and locks, the run-folder format, typed reading, errors and process groups.

It imports nothing from the floors above it (the measures, `interp.causal`, `interp.views`, `interp.cli`), so that
`training` can load a model and write a run with it alone.
"""
