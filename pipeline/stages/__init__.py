"""One module per stage, each with a public ``run_<stage>(...)`` entry point taking typed arguments.

The runner and every CLI command call these and nothing else.
"""
