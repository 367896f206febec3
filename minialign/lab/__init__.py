"""The lab: the experiments and benchmarks behind minialign's result tables, apart from the core.

    python -m minialign.lab NAME [--flags]    # NAME: an experiment (``experiments.EXPERIMENTS``) or bench
    python -m minialign.lab --help

Nothing in the core imports from here: these modules use the stages, decoders and evaluation as a
reader of the core would, and write their tables under ``out/``.
"""
