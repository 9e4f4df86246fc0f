"""Streaming Mixture-of-Experts JEPA pretraining (Brain-JEPA for fMRI, Neuro-JEPA for structural MRI).

Modules: :mod:`.config` (typed TOML config), :mod:`.routers` and :mod:`.moe`
(Mixture-of-Experts FFN), :mod:`.vit` (transformer blocks), :mod:`.masks`
(mask collators), :mod:`.fmri_jepa` and :mod:`.struct_jepa` (models),
:mod:`.checkpoint` and :mod:`.train` (training loop). Nothing heavy is
imported here so ``import pipeline.pretrain`` stays cheap.
"""
