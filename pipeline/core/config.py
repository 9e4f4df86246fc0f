"""Typed, frozen configuration for every stage, loaded from TOML.

Each stage owns one frozen dataclass section; :class:`Config` gathers them.
Every default is written out by :func:`dump_config`, and the resolved config
is saved next to every output with :func:`write_resolved_config`.

Loading is strict: an unknown key or a value of the wrong type is an error
that names the file and the key, because a silently ignored typo in a
threshold is how curation goes wrong without anyone noticing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

__all__ = [
    "AnatConfig",
    "Config",
    "ConfigError",
    "DaskConfig",
    "ExecutionConfig",
    "TemplatesConfig",
    "config_hash",
    "config_to_dict",
    "dump_config",
    "from_dict",
    "load_config",
    "write_resolved_config",
]


class ConfigError(ValueError):
    """A configuration file or value is invalid."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ExecutionConfig:
    """How the nipype graphs run.

    ``plugin`` is any nipype execution plugin (MultiProc, Linear, SLURM, SGE,
    PBS, ...); ``plugin_args`` are passed to it (``--plugin-arg`` values are
    parsed to int, float or bool first). ``nprocs`` 0 uses every core this
    process may use (CPU affinity, cgroup quota, ``SLURM_CPUS_ON_NODE``);
    ``omp_nthreads`` 0 gives each node ``min(nprocs - 1, 8)`` threads (at
    least 1), as fMRIPrep does; ``mem_gb`` 0 lets MultiProc schedule nodes
    within 90 % of the available memory (cgroup limit or RAM), any other value
    is that budget in GB.
    """

    plugin: str = "MultiProc"
    nprocs: int = 0
    omp_nthreads: int = 0
    mem_gb: float = 0.0
    poll_sleep_duration: float = 0.05
    stop_on_first_crash: bool = False
    plugin_args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DaskConfig:
    """Where the group-level maps run: shard writing, the group QC metrics and the group connectome.

    ``scheduler`` is the address of a running ``dask scheduler``
    (``"tcp://host:8786"``): every map goes to its workers. Without it,
    ``local_cluster = true`` starts a dask.distributed LocalCluster of
    ``workers`` processes (``threads_per_worker`` threads each) for the run;
    otherwise the group QC metrics and the connectome use ``workers`` local
    threads and shards keep ``[shards] workers``/``scheduler``. ``workers`` 0
    is every available core.
    """

    scheduler: str = ""
    local_cluster: bool = False
    workers: int = 0
    threads_per_worker: int = 1


@dataclass(frozen=True)
class TemplatesConfig:
    """Where MNI152NLin6Asym templates come from.

    The 2 mm templates ship inside the package. ``template_dir`` (a flat
    folder of ``MNI152NLin6Asym_res-<r>_...`` files or a TemplateFlow tree
    with a ``tpl-MNI152NLin6Asym`` folder) is searched first, and is required
    for 1 mm outputs.
    """

    template_dir: str = ""
    name: str = "MNI152NLin6Asym"


@dataclass(frozen=True)
class AnatConfig:
    """Anatomical preprocessing parameters."""

    skull_strip: Literal["deepbet", "template"] = "deepbet"
    output_resolutions: tuple[int, ...] = (2,)
    # "syn": ANTs SyN (quick preset, started from the affine) after the affine; the transform to MNI is then
    # an ITK composite (.h5) used for the anatomical and the BOLD outputs. "affine": the 12-dof affine only.
    registration: Literal["affine", "syn"] = "affine"
    # Registration runs at this template resolution; 2 mm keeps each affine start near 4 s.
    registration_resolution: int = 2
    # Mattes mutual information; GC (global correlation) is the alternative for same-contrast pairs.
    registration_metric: Literal["mattes", "GC", "meansquares"] = "mattes"
    registration_iterations: tuple[int, ...] = (2100, 1200, 1200, 10)
    registration_shrink_factors: tuple[int, ...] = (6, 4, 2, 1)
    registration_smoothing_sigmas: tuple[float, ...] = (3.0, 2.0, 1.0, 0.0)
    # Share of the template voxels the affine metric samples (ANTs' random sampling rate). Issue 13: 0.05 broke
    # the 1 mm known-transform bound on a held-out scan, 0.1 came within 0.05 mm of it: 0.2 kept.
    registration_sampling_rate: float = 0.2
    # > 0: the moving image is smoothed and resampled to this grid before registering (issue 13: the template
    # is 2 mm, a 1 mm moving image only adds cost); 0 = the scan's own grid (the pre-issue-13 behaviour).
    registration_moving_resolution_mm: float = 2.0
    # The affine runs from the centres of mass and also from the best of a grid of rotations within
    # +-init_arc_deg of the header (steps of init_step_deg about each axis; ANTs' antsAffineInitializer on 4 mm
    # copies); the result with the higher mutual information is kept (~3x the time of one start). 0 = the
    # centre-of-mass start only (before issue 16; it failed on 5.5 mm stacks tilted by 12 degrees).
    registration_init_arc_deg: float = 27.0
    registration_init_step_deg: float = 15.0
    registration_seed: int = 13
    # SyN levels (iterations per level, coarse to fine; the quick preset's 40x20x0) and metric.
    syn_iterations: tuple[int, ...] = (40, 20, 0)
    syn_metric: Literal["mattes", "CC", "meansquares"] = "mattes"
    # N4 fits the field on a copy at n4_working_resolution_mm (when the scan is finer) and interpolates it
    # back; inside N4 that copy is shrunk by n4_shrink_factor. Issue-13 default 3 mm x 2 with 25 iterations
    # per level (a 6 mm fit, ~3 s CPU per 1 mm scan); the pre-issue-13 setting was the native grid (0) x 4
    # with 50 per level (30-45 s per 1 mm scan).
    n4_shrink_factor: int = 2
    n4_working_resolution_mm: float = 3.0
    n4_iterations: tuple[int, ...] = (25, 25, 25, 25)
    n4_convergence: float = 1e-7
    deepbet_threshold: float = 0.5
    # Cube the deepbet bounding box is resampled to; 192 matches 256's Dice at a third of the CPU time.
    # Issue 13: 160 falls below Dice 0.97 vs 192 on the neck scan and 7 of 19 corpus T1w: 192 kept.
    deepbet_shape: int = 192
    # Largest tolerated disagreement between qform and sform (mm of any corner
    # of the field of view) before we pick the sform and say so.
    qform_sform_tolerance_mm: float = 1.0
    modalities: tuple[str, ...] = ("T1w", "T2w", "FLAIR")

    def affine_kwargs(self) -> dict[str, object]:
        """These settings as keyword arguments of ``workflows.ops.anat.register_affine`` (and its interface)."""
        return {
            "metric": self.registration_metric,
            "iterations": list(self.registration_iterations),
            "shrink_factors": list(self.registration_shrink_factors),
            "smoothing_sigmas": [float(s) for s in self.registration_smoothing_sigmas],
            "sampling_rate": self.registration_sampling_rate,
            "moving_resolution_mm": self.registration_moving_resolution_mm,
            "init_arc_deg": self.registration_init_arc_deg,
            "init_step_deg": self.registration_init_step_deg,
            "seed": self.registration_seed,
        }


@dataclass(frozen=True)
class ShardsConfig:
    """Zarr v3 shard writing (``neurocurate shards``).

    fMRI runs are stored per atlas as ROI x time matrices (variable length,
    ``samples_per_shard`` runs per shard file); anatomical volumes are cropped
    or padded to ``crop_box`` on the 2 mm MNI grid, ``anat_samples_per_shard``
    per shard file. Splits are assigned per subject from a hash of
    ``split_seed`` and the subject label, so adding subjects never moves an
    existing subject to another split.
    """

    shards_dir: str = ""  # "" = OUTPUT_DIR/shards
    atlas: str = ""  # "" = every atlas in the curation table
    samples_per_shard: int = 256
    anat_samples_per_shard: int = 16
    # Frames per inner zarr chunk: the unit of a partial (random-access) read;
    # large chunks keep whole-shard reads near disk speed.
    chunk_frames: int = 1024
    crop_box: tuple[int, int, int] = (96, 112, 96)
    fmri_dtype: Literal["float32", "float16"] = "float32"
    anat_dtype: Literal["float16", "float32"] = "float16"
    # "auto": no compression for fMRI series (zstd saves ~7% on ABIDE but reads
    # 3x slower), zstd for anatomical volumes (mostly background).
    compressor: Literal["auto", "zstd", "none"] = "auto"
    compression_level: int = 1
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: int = 0
    # Frames per training run kept for the per-ROI median/IQR statistics.
    norm_frames_per_sample: int = 32
    workers: int = 1
    scheduler: Literal["threads", "processes", "synchronous"] = "threads"


@dataclass(frozen=True)
class LoaderConfig:
    """Streaming loader over the shards (``pipeline.store.loader.ShardDataset``).

    Not a section of the TOML config: the stage that reads the shards decides these (pretraining takes
    the window from its model config, evaluation reads whole runs), so a ``[loader]`` section is an
    unknown key like any other.

    ``window_length`` frames are cropped from every fMRI run (random start in
    training, centred in evaluation); 0 keeps whole runs. Runs shorter than
    the window are zero-padded (``short_policy="pad"``, ``n_frames`` tells the
    real length) or left out (``"drop"``).
    """

    window_length: int = 160
    shuffle_buffer: int = 256
    seed: int = 0
    normalization: Literal["roi_robust", "none"] = "roi_robust"
    short_policy: Literal["pad", "drop"] = "pad"


@dataclass(frozen=True)
class ParcellationConfig:
    """Which atlas ROI series are extracted with.

    ``atlas`` is a bundled atlas name (``Schaefer400Tian3``: Schaefer-400
    7-network cortex + Tian S3 subcortex, 450 ROIs, 2 mm) or the path of any
    integer-label NIfTI; ``label_table`` names its ROIs (Schaefer/Tian
    ``_label.txt``, BIDS ``dseg.tsv`` or ``index name`` lines).
    """

    atlas: str = "Schaefer400Tian3"
    label_table: str = ""


@dataclass(frozen=True)
class GradientsConfig:
    """Diffusion-map gradients of the group functional connectome.

    The connectome is the mean over subjects of Fisher-z correlations; each row
    keeps its top ``1 - sparsity`` connections; the affinity is the
    normalized angle between rows; diffusion maps use ``alpha`` and
    ``diffusion_time`` (0 = Margulies scaling lambda / (1 - lambda)).
    Gradients are ordered by descending eigenvalue; each is signed so that
    its largest-magnitude entry is positive, or, with ``reference``, aligned
    (Procrustes, or sign flips only) to the gradients in that TSV.
    """

    atlas: str = ""  # empty: the parcellation atlas
    n_components: int = 30
    sparsity: float = 0.9
    alpha: float = 0.5
    diffusion_time: float = 0.0
    kernel: Literal["normalized_angle", "cosine"] = "normalized_angle"
    reference: str = ""
    alignment: Literal["procrustes", "sign"] = "procrustes"
    min_subjects: int = 1


@dataclass(frozen=True)
class ImportConfig:
    """Import of precomputed ROI series (ABIDE PCP ``.1D``, TSV, CSV, NPY).

    ``site_repetition_time`` gives the TR (s) per ``SITE_ID`` of the ABIDE
    phenotypic file (ABIDE-I scan parameters); ``repetition_time`` > 0
    overrides it for every file. Runs shorter than ``min_volumes`` are
    reported (curation fails them from ``NumberOfVolumes``).
    """

    atlas_name: str = "CC200"
    task: str = "rest"
    repetition_time: float = 0.0
    min_volumes: int = 100
    site_repetition_time: dict[str, float] = field(
        default_factory=lambda: {
            "NYU": 2.0, "UM_1": 2.0, "UCLA_1": 3.0, "USM": 2.0, "MAX_MUN": 3.0, "TRINITY": 2.0,
        }
    )


@dataclass(frozen=True)
class AnatQCThresholds:
    """Layer-1 (absolute) curation rules of one anatomical modality (metrics in MNI space, 2 mm).

    Only what is physically unambiguous has an absolute limit: the share of
    the template brain that has signal at all, and the contrast signature of
    the modality (T1w: WM brighter than GM, CSF darker; T2w: CSF brighter
    than GM, WM darker; FLAIR: WM and CSF darker than GM), read as median
    ratios in the template's WM, GM and CSF regions (clean corpus T1w: WM/GM
    1.12-1.46, CSF/GM 0.46-0.81; T2w: WM/GM 0.83-0.89, CSF/GM 1.06-1.16). Everything that depends
    on scanner, field strength, resolution, age or pathology (SNR, CJV,
    template correlation, ...) is judged against reference distributions
    instead (layer 2, :class:`QCConfig` ``reference_z_limit``). A field
    ``min_<metric>`` requires ``metric >= value``, ``max_<metric>``
    ``metric <= value``; a NaN metric skips its rule. The subclasses hold
    each modality's signature.
    """

    # A brain with less than 80 % of the template brain covered by signal is cropped or empty
    # (clean corpus scans, including 5-5.5 mm stacks and a neck field of view: >= 0.94).
    min_brain_coverage: float = 0.8
    # A void in the brain that a 12 mm ball fits into, over 2 % of the template brain (~30 mL, a
    # ball ~38 mm across) is missing tissue, a dropout slab or a cut field of view: 0 on every
    # clean real scan (aged 19-96, glioma, lesions, 5.5 mm stacks; qc.metrics.signal_void).
    max_signal_void: float = 0.02
    min_wm_gm_ratio: float = 1.0
    max_csf_gm_ratio: float = 1.0


@dataclass(frozen=True)
class T1wQCThresholds(AnatQCThresholds):
    """T1w signature: WM > GM > CSF (see :class:`AnatQCThresholds`)."""


@dataclass(frozen=True)
class T2wQCThresholds:
    """T2w absolute rules: coverage and the signature CSF > GM > WM (see :class:`AnatQCThresholds`)."""

    min_brain_coverage: float = 0.8
    max_signal_void: float = 0.02
    max_wm_gm_ratio: float = 1.0
    min_csf_gm_ratio: float = 1.0


@dataclass(frozen=True)
class FLAIRQCThresholds:
    """FLAIR absolute rules: coverage and the signature "CSF darker than GM" (suppressed fluid).

    No absolute WM/GM rule: on the corpus FLAIRs (NiChart, aged 76-96, many with
    white-matter lesions) the median WM/GM ratio is 0.96-1.03, so WM vs GM does
    not separate FLAIR from T1w physically; a T1w labelled FLAIR is left to the
    reference (its ratio 1.1-1.5 is far from real FLAIRs) and the classifier.
    """

    min_brain_coverage: float = 0.8
    max_signal_void: float = 0.02
    max_csf_gm_ratio: float = 1.0


@dataclass(frozen=True)
class BoldQCThresholds:
    """Curation rules for a preprocessed BOLD run.

    FD limits follow Power et al. (2012) / Parkes et al. (2018): mean FD
    above 0.5 mm or more than 20 % of volumes above 0.2 mm is gross motion.
    Fewer than 100 volumes is too short for the pretraining crops.
    """

    min_tsnr: float = 20.0
    max_fd_mean: float = 0.5
    max_fd_max: float = 5.0
    max_fd_perc: float = 20.0
    min_n_volumes: int = 100


@dataclass(frozen=True)
class TimeseriesQCThresholds:
    """Curation rules for ROI time series (imported or preprocessed)."""

    min_n_volumes: int = 100
    max_zero_variance_fraction: float = 0.05


@dataclass(frozen=True)
class QCConfig:
    """Quality control and curation, in four layers (see :mod:`qc.curation`).

    1. Absolute rules: the ``min_``/``max_`` fields of the per-modality sections.
    2. Reference rules: every anatomical metric is compared with its
       distribution on real clean scans of six sources
       (``qc/data/reference_anat.tsv``, regenerated by
       ``benchmarks/qc_generalisation.py reference``); a scan fails when its
       robust z (median/MAD of the reference) exceeds ``reference_z_limit`` in
       the direction that means degradation. ``reference_table`` names
       another table ("" = the shipped one).
    3. Dataset outliers: robust z within each (modality, site) group of the
       dataset being curated; reported in ``outlier_metrics`` for groups of at
       least ``outlier_min_group`` scans, and a rule (fail above
       ``outlier_k``) for anatomical groups of a known site with at least
       ``outlier_rule_min_group`` scans, on the metrics of the acquisition
       (noise, contrast, ghosting, bias, blur, coverage), each metric's site
       scale at least ``outlier_scale_floor`` times its reference scale
       (:func:`qc.curation.dataset_rule_z`). Sites come from the column
       ``site_column`` of ``OUTPUT_DIR/participants.tsv``; a scan whose
       subject has none there is grouped by its acquisition (voxel size,
       data type, scanner: :func:`qc.group.acquisition_site`).
    4. Classifier: monotone gradient boosting on reference z-scores, trained on the
       shipped artifact table (``qc/data/classifier_training.tsv``) plus this
       dataset's reviewer ratings, each rating repeated ``rating_weight``
       times; a scan fails when P(artifact) >= ``classifier_threshold``.
       ``classifier_training`` names another training table ("" = the shipped
       one); ``classifier = false`` turns the layer off. For a scan of a known
       site with at least ``site_calibration_min_group`` scans of its modality
       in the dataset (0 = never), the classifier reads the scan's z-scores
       from the site's typical scan (the group's median) instead of the
       reference median, where the site sits towards degradation by at most
       ``reference_z_limit``: a scanner's or population's style is not an
       artifact, a scan worse than its own site is (:func:`qc.reference.site_shifts`).
       With ``classifier_style_transplant`` the model is also trained on every
       training row moved into the style of each other source of its modality
       (:func:`qc.classifier.style_transplants`), so that a new scanner's style
       is not read as an artifact.

    ``mi_bins`` is the joint-histogram size for mutual information.
    """

    t1w: T1wQCThresholds = field(default_factory=T1wQCThresholds)
    t2w: T2wQCThresholds = field(default_factory=T2wQCThresholds)
    flair: FLAIRQCThresholds = field(default_factory=FLAIRQCThresholds)
    bold: BoldQCThresholds = field(default_factory=BoldQCThresholds)
    timeseries: TimeseriesQCThresholds = field(default_factory=TimeseriesQCThresholds)
    reference_table: str = ""
    # Both chosen by leave-one-source-out over the 9 sources of benchmarks/qc_generalisation.py (smallest values
    # whose inner false-reject rate on clean + mild stays <= 0.03); see benchmarks/README.md for what they reach.
    reference_z_limit: float = 8.0
    # The dataset rule's limit, chosen the same way on the corpus' groups of 5-9 clean scans (NiChart, ds000011,
    # with the rule's minimum lowered to 5 there). At that size the rule rejects mild copies, and 9 % of clean
    # FLAIRs in groups of 5 (0 from 8 scans), so it needs 10.
    outlier_k: float = 3.5
    outlier_min_group: int = 5
    outlier_rule_min_group: int = 10
    outlier_scale_floor: float = 1.0
    site_column: str = "site"
    classifier: bool = True
    classifier_training: str = ""
    classifier_threshold: float = 0.9
    classifier_style_transplant: bool = True
    site_calibration_min_group: int = 5
    rating_weight: int = 20
    mi_bins: int = 64


@dataclass(frozen=True)
class BoldConfig:
    """BOLD preprocessing and denoising (``workflows.bold``).

    ``dummy_scans`` < 0 detects non-steady-state volumes from the global
    signal (at most ``max_dummy_scans``); >= 0 removes exactly that many.
    Motion correction registers every volume rigidly to a median reference
    of the first ``reference_volumes`` steady-state volumes, inside the
    reference's brain mask, each fit starting from the previous volume's.
    ``moco_method = "gauss_newton"`` (default) is a deterministic
    coarse-to-fine least-squares fit: level ``k`` smooths by
    ``moco_smoothing_sigmas[k]`` voxels, samples every
    ``moco_shrink_factors[k]``-th voxel and runs at most
    ``moco_iterations[k]`` Gauss-Newton steps (156 volumes: ~10-20 s on one
    core); ``"ants"`` runs one ``ants.registration`` per volume with the same
    schedule as ANTs shrink factors / sigmas / iterations and random metric
    sampling at ``moco_sampling_rate`` seeded with ``random_seed`` (about 5x
    slower). Runs with a T1w are registered rigidly to it and reach MNI
    through the anatomical transform; runs without one are registered to
    ``epi_template`` (empty: ``SPM_OldNorm_EPI_2mm.nii.gz`` or
    ``tpl-MNI152NLin6Asym_res-02_desc-EPI_boldref.nii.gz`` in
    ``templates.template_dir``; the bundled T2w template, with a warning,
    when neither exists) after a centre-of-mass initialisation.

    Denoising produces the ROI series only (the ``desc-preproc_bold`` image
    stays undenoised). ``denoise`` names a preset of
    ``workflows.ops.denoise`` (nilearn ``load_confounds`` on the run's
    fMRIPrep-style confounds, then ``nilearn.signal.clean``): ``none``,
    ``task``, ``simple``, ``simple_gsr``, ``scrubbing``, ``scrubbing_gsr``,
    ``compcor``, ``compcor_gsr``; ``auto`` gives ``denoise_task`` to runs
    with an ``events.tsv`` and ``denoise_rest`` to the others. ``high_pass``
    (Hz) sets the cosine drift terms of every preset (0: none);
    ``low_pass`` (Hz, 0: none) low-passes every preset but ``task`` and
    ``none``; ``motion_regressors`` (6, 12, 24; 0: none) is the motion model
    of ``simple``/``scrubbing``/``compcor``; ``task`` keeps only those of the
    6 motion parameters and WM/CSF means whose correlation with the
    HRF-convolved design is at most ``task_max_design_r``. Scrubbing censors
    volumes with FD > ``scrub_fd_threshold`` mm or standardised DVARS >
    ``scrub_dvars_threshold`` and segments shorter than
    ``scrub_min_segment``. ``compcor_components`` aCompCor components of the
    combined WM + CSF mask go into the confounds TSV and the ``compcor``
    presets.
    """

    min_volumes: int = 5
    # Header and sidecar TRs further apart than this (s) are reported.
    tr_tolerance: float = 0.01
    dummy_scans: int = -1
    max_dummy_scans: int = 10
    dummy_zscore: float = 3.5
    reference_volumes: int = 10
    motion_correction: bool = True
    moco_method: Literal["gauss_newton", "ants"] = "gauss_newton"
    moco_iterations: tuple[int, ...] = (20, 4)
    moco_shrink_factors: tuple[int, ...] = (3, 1)
    moco_smoothing_sigmas: tuple[float, ...] = (1.5, 0.0)
    moco_sampling_rate: float = 0.3
    # Seeds ANTs' metric sampling so reruns give identical transforms.
    random_seed: int = 42
    template_transform: Literal["Rigid", "Affine"] = "Rigid"
    epi_template: str = ""
    fd_radius_mm: float = 50.0
    # Denoising of the ROI series.
    denoise: Literal["auto", "none", "task", "simple", "simple_gsr", "scrubbing", "scrubbing_gsr",
                     "compcor", "compcor_gsr"] = "auto"
    denoise_task: Literal["none", "task", "simple", "simple_gsr", "scrubbing", "scrubbing_gsr",
                          "compcor", "compcor_gsr"] = "task"
    denoise_rest: Literal["none", "task", "simple", "simple_gsr", "scrubbing", "scrubbing_gsr",
                          "compcor", "compcor_gsr"] = "simple"
    detrend: bool = True
    high_pass: float = 0.008
    low_pass: float = 0.0
    motion_regressors: Literal[0, 6, 12, 24] = 24
    task_max_design_r: float = 0.1
    scrub_fd_threshold: float = 0.5
    scrub_dvars_threshold: float = 1.5
    scrub_min_segment: int = 5
    compcor_components: int = 5
    standardize: bool = False
    # Tissue masks for the WM/CSF signals: erosions (2 mm voxels) of the
    # k-means classes of the (subject or template) T1w in MNI space.
    wm_erosion: int = 2
    csf_erosion: int = 1


@dataclass(frozen=True)
class EvaluateConfig:
    """Frozen-embedding evaluation against baselines (``neurocurate evaluate``).

    Linear probes pick their regularisation (``logistic_cs`` / ``ridge_alphas``)
    by ``inner_folds``-fold cross-validation grouped by subject inside each
    training fold. Confidence intervals come from ``bootstrap_resamples``
    subject-level bootstrap resamples; the model is compared with the best
    baseline by a paired permutation test with ``permutations`` label-free
    swaps of the two models' predictions. fMRI runs are embedded in windows
    of the run's ``fmri.num_frames`` that cover the whole run (overlapping
    where needed, at most ``max_windows``), averaged. ``baselines`` picks from ``fc_pearson``, ``fc_tangent``,
    ``random_encoder`` (fMRI) and ``random_encoder``, ``intensity_pca``,
    ``cnn3d`` (structural); ``threads`` is torch's CPU thread count and the
    tangent baseline's worker count (0 = every usable core; BLAS runs one thread).
    ``readouts`` of the frozen fMRI encoder (each also applied to the random
    encoder): ``mean`` (all tokens averaged), ``roi`` (per-ROI embeddings,
    tokens averaged over time, R x D), ``roi_similarity`` (Fisher-z cosine
    similarities between the ROI embeddings), ``token_similarity`` (the same
    between the ROIs' time-resolved tokens). ``finetune_epochs`` > 0 adds
    end-to-end fine-tuning of the encoder with a linear head on each
    training fold (``finetune_lr`` for the encoder, 10x for the head).
    """

    seed: int = 0
    kfold: int = 5
    inner_folds: int = 5
    bootstrap_resamples: int = 1000
    permutations: int = 1000
    confidence: float = 0.95
    few_shot_resamples: int = 5
    logistic_cs: tuple[float, ...] = (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0)
    ridge_alphas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
    max_windows: int = 8
    batch_size: int = 16
    attentive_probe: bool = True
    readouts: tuple[str, ...] = ("mean", "roi", "roi_similarity", "token_similarity")
    finetune_epochs: int = 0
    finetune_lr: float = 0.0001
    attentive_epochs: int = 60
    attentive_lr: float = 0.003
    attentive_weight_decay: float = 0.05
    attentive_heads: int = 1
    baselines: tuple[str, ...] = ("fc_pearson", "fc_tangent", "random_encoder", "intensity_pca", "cnn3d")
    pca_components: int = 50
    cnn_epochs: int = 20
    cnn_channels: int = 8
    cnn_lr: float = 0.001
    threads: int = 0


@dataclass(frozen=True)
class RunConfig:
    """End-to-end runs (``neurocurate run`` / ``neurocurate demo``).

    ``pretrain_config`` is a named pretraining config (tiny, small, base) or a
    TOML file; ``pretrain_max_steps`` > 0 overrides its ``train.max_steps``.
    The evaluate stage probes ``evaluate_target`` (a participants.tsv column)
    with the ``evaluate_split`` scheme; an empty target skips the stage.
    ``hash_chunk_mb`` is the read size when a changed input is re-hashed.
    """

    pretrain_config: str = "tiny"
    pretrain_max_steps: int = 0
    evaluate_target: str = "diagnosis"
    evaluate_split: Literal["kfold", "site", "subject"] = "kfold"
    hash_chunk_mb: int = 8


# --- stage sections are added above this line --------------------------------


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration."""

    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    dask: DaskConfig = field(default_factory=DaskConfig)
    templates: TemplatesConfig = field(default_factory=TemplatesConfig)
    anat: AnatConfig = field(default_factory=AnatConfig)
    bold: BoldConfig = field(default_factory=BoldConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    parcellation: ParcellationConfig = field(default_factory=ParcellationConfig)
    gradients: GradientsConfig = field(default_factory=GradientsConfig)
    timeseries_import: ImportConfig = field(default_factory=ImportConfig)
    qc: QCConfig = field(default_factory=QCConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    run: RunConfig = field(default_factory=RunConfig)


# --------------------------------------------------------------------------- machinery


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return from_dict(tp, value, where=where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return dict(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], *, where: str = "config") -> Any:
    """Build the frozen dataclass ``cls`` from a plain mapping, strictly.

    Parameters
    ----------
    cls : type
        A dataclass type.
    data : dict
        Values; missing keys take the dataclass defaults.
    where : str
        Prefix used in error messages (file name and key path).

    Raises
    ------
    ConfigError
        On an unknown key or a value of the wrong type.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists)."""
    return _plain(cfg)


def dump_config(cfg: Any) -> str:
    """TOML text with every value written out."""
    return tomli_w.dumps(config_to_dict(cfg))


def config_hash(cfg: Any) -> str:
    """Stable SHA-256 of a config (or a section), for rerun manifests."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def load_config(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Load a TOML config, apply command-line overrides and return a :class:`Config`.

    Parameters
    ----------
    path : path-like, optional
        TOML file; ``None`` gives every default.
    overrides : dict, optional
        ``{section: {key: value}}`` applied on top of the file (the CLI flags).
    """
    data: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    for section, values in (overrides or {}).items():
        data.setdefault(section, {})
        data[section] = {**data[section], **values}
    return from_dict(Config, data, where=where)


def write_resolved_config(cfg: Any, directory: str | Path, name: str = "neurocurate_config.toml") -> Path:
    """Write the resolved config next to a stage's outputs, atomically."""
    from pipeline.core.atomic import atomic_write_text

    target = Path(directory) / name
    atomic_write_text(target, dump_config(cfg))
    return target
