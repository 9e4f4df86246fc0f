"""Evaluation of pretrained encoders: frozen-embedding probes against honest baselines.

Modules: :mod:`.metrics` (metrics, bootstrap intervals, permutation tests),
:mod:`.splits` (subject-grouped folds, leave-site-out, few-shot draws),
:mod:`.probes` (nested-CV linear and attentive probes), :mod:`.baselines`
(functional connectivity, intensity PCA, 3D CNN), :mod:`.embed` (frozen
target-encoder embeddings and routing counts from a run), :mod:`.routing`
(networks of ROIs, routing maps), :mod:`.report` (JSON + HTML) and
:mod:`.run` (the stage). Nothing heavy is imported here.
"""
