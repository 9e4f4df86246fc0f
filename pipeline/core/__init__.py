"""The floor every stage stands on: config, errors, atomic writes, BIDS, templates, the output layout, manifests.

Nothing in here imports a stage, a workflow or the QC package.
"""
