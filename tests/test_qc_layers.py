"""The four curation layers on planted cases, the contrast-free metrics, and the refit from ratings (CLI)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import QCConfig
from pipeline.core.templates import get_template
from qc import classifier, curation, reference
from qc.metrics import (
    edge_correlation,
    pearson_correlation,
    template_tissues,
    tissue_contrast,
)

# A clean T1w scan in the planted reference: every metric at its median.
MEDIANS = {"correlation": 0.65, "edge_correlation": 0.5, "nmi": 1.04, "mi": 0.3, "psnr": 13.0, "brain_coverage": 0.999,
           "snr": 20.0, "cnr": 2.5, "cjv": 0.45, "efc": 0.5, "fber": 100.0, "wm2max": 0.7, "inu_range": 0.15,
           "wm_gm_ratio": 1.3, "csf_gm_ratio": 0.5, "blur_ap_lr": 0.15, "air_signal": 0.04, "brain_holes": 0.005,
           "signal_void": 0.0, "wm_trend": 0.1}
SCALE = 0.1  # relative robust SD of every planted metric


def _planted_reference(path: Path) -> Path:
    rows = [{"modality": "T1w", "metric": m, "direction": reference.direction("T1w", m), "median": v,
             "scale": abs(v) * SCALE, "n": 20, "n_sources": 5} for m, v in MEDIANS.items()]
    pd.DataFrame(rows, columns=list(reference.REFERENCE_COLUMNS)).to_csv(path, sep="\t", index=False)
    return path


def _scan(z: dict[str, float] | None = None) -> dict[str, float]:
    """Metrics ``z`` robust SDs from the planted medians, towards degradation."""
    out = dict(MEDIANS)
    for m, k in (z or {}).items():
        d = reference.direction("T1w", m) or 1
        out[m] = MEDIANS[m] - d * k * abs(MEDIANS[m]) * SCALE
    return out


def _planted_training(path: Path, rng: np.random.Generator) -> Path:
    rows = []
    for i in range(150):  # clean: every metric within ~1 SD
        rows.append({"modality": "T1w", "label": 0, **_scan({m: rng.normal(0, 1) for m in ("air_signal", "wm_trend")})})
    for i in range(150):  # severe: signal in the air (ghosting/noise) far up
        rows.append({"modality": "T1w", "label": 1, **_scan({"air_signal": rng.uniform(8, 20)})})
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


@pytest.fixture()
def qc_cfg(tmp_path: Path) -> QCConfig:
    rng = np.random.default_rng(0)
    return dataclasses.replace(
        QCConfig(),
        reference_table=str(_planted_reference(tmp_path / "ref.tsv")),
        classifier_training=str(_planted_training(tmp_path / "train.tsv", rng)),
    )


def _rec(subject: str, metrics: dict[str, float], site: str = "A", modality: str = "T1w") -> dict:
    return {"subject": subject, "modality": modality, "site": site,
            "path": f"sub-{subject}/anat/sub-{subject}_{modality}.nii.gz", **metrics}


# ----------------------------------------------------------------------------- metrics


def test_edge_correlation_does_not_assume_the_contrast() -> None:
    t2 = np.asanyarray(nib.load(get_template(2, "T2w")).dataobj).astype(np.float32)
    t1 = np.asanyarray(nib.load(get_template(2, "T1w")).dataobj).astype(np.float32)
    mask = np.asanyarray(nib.load(get_template(2, "mask", "brain")).dataobj) > 0
    # A FLAIR-like image: the T2 contrast with CSF (the brightest T2 class) made dark.
    csf = mask & (t2 > np.percentile(t2[mask], 85))
    flair = np.where(csf, 0.2 * t2, t2)
    assert pearson_correlation(t1, t2, mask) < 0  # contrast-bound metric: T1 vs T2 anticorrelate
    assert edge_correlation(t1, t2, mask) > 0.5  # edges line up whatever the contrast
    assert edge_correlation(flair, t2, mask) > 0.4
    upside_down = t2[:, :, ::-1]
    assert edge_correlation(upside_down, t2, mask) < 0.3


def test_tissue_contrast_gives_the_modality_signature() -> None:
    t1 = np.asanyarray(nib.load(get_template(2, "T1w")).dataobj).astype(np.float32)
    t2 = np.asanyarray(nib.load(get_template(2, "T2w")).dataobj).astype(np.float32)
    mask = np.asanyarray(nib.load(get_template(2, "mask", "brain")).dataobj) > 0
    tissues = template_tissues(t1, mask)
    c1, c2 = tissue_contrast(t1, tissues), tissue_contrast(t2, tissues)
    assert c1["wm_gm_ratio"] > 1 > c1["csf_gm_ratio"]
    assert c2["wm_gm_ratio"] < 1 < c2["csf_gm_ratio"]
    qc = QCConfig()
    assert curation.evaluate_rules(c1, "T1w", qc)[0] and curation.evaluate_rules(c2, "T2w", qc)[0]
    assert not curation.evaluate_rules(c2, "T1w", qc)[0]  # T2w labelled T1w
    assert not curation.evaluate_rules(c1, "T2w", qc)[0]
    assert not curation.evaluate_rules(c2, "FLAIR", qc)[0]  # T2w labelled FLAIR: bright CSF


# ----------------------------------------------------------------------------- layers


def test_layer1_absolute_coverage_and_signature(qc_cfg: QCConfig) -> None:
    df = curation.build_table([_rec("ok", _scan()), _rec("crop", {**_scan(), "brain_coverage": 0.5}),
                               _rec("t2", {**_scan(), "wm_gm_ratio": 0.8, "csf_gm_ratio": 1.6})], qc_cfg)
    by = df.set_index("subject")
    assert by.loc["ok", "qc_pass"] and by.loc["ok", "qc_layer"] == ""
    assert "absolute" in by.loc["crop", "qc_layer"] and "50% of the template brain" in by.loc["crop", "qc_reason"]
    assert "absolute" in by.loc["t2", "qc_layer"] and "wrong modality" in by.loc["t2", "qc_reason"]


def test_signal_void_sees_missing_tissue_not_dark_csf() -> None:
    """A 30 mm spherical void in a T1 template brain fills > 2 % of it; widening every dark (CSF) region by
    one voxel, as atrophy does, leaves no void a 12 mm ball fits into (``brain_holes`` grows with both)."""
    from scipy import ndimage

    from qc.metrics import brain_holes, signal_void

    t1 = np.asanyarray(nib.load(get_template(2, "T1w")).dataobj).astype(np.float32)
    mask = np.asanyarray(nib.load(get_template(2, "mask", "brain")).dataobj) > 0
    assert signal_void(t1, mask) == 0.0
    centre = np.array(ndimage.center_of_mass(mask)) + np.array([12.0, 0.0, 7.0])  # voxels, right and up
    ball = ((np.indices(t1.shape) - centre[:, None, None, None]) ** 2).sum(axis=0) <= 15.0**2
    lesioned = np.where(ball, 0.0, t1)
    assert signal_void(lesioned, mask) > 0.02
    med = float(np.median(t1[mask]))
    atrophied = np.where(ndimage.binary_dilation(t1 < 0.45 * med) & mask, 0.0, t1)
    assert brain_holes(atrophied, mask) > 10 * brain_holes(t1, mask)
    assert signal_void(atrophied, mask) < 0.005


def test_layer1_absolute_signal_void(qc_cfg: QCConfig) -> None:
    df = curation.build_table([_rec("ok", _scan()), _rec("void", {**_scan(), "signal_void": 0.06})], qc_cfg)
    by = df.set_index("subject")
    assert by.loc["ok", "qc_pass"]
    assert by.loc["void", "qc_layer"].startswith("absolute")
    assert "signal voids at least 12 mm across fill 6.0% of the template brain" in by.loc["void", "qc_reason"]


def test_reference_leaves_out_metrics_it_cannot_judge(qc_cfg: QCConfig) -> None:
    # FBER and brain_holes are reported but not judged against the reference (qc.reference.NOT_REFERENCED).
    rec = _rec("zero_background", {**_scan(), "fber": 1e-3, "brain_holes": 0.5})
    by = curation.build_table([rec], dataclasses.replace(qc_cfg, classifier=False)).set_index("subject")
    assert by.loc["zero_background", "qc_pass"], by.loc["zero_background", "qc_reason"]
    assert set(reference.NOT_REFERENCED) <= set(reference.ANAT_METRICS)
    assert not set(reference.NOT_REFERENCED) & set(reference.REFERENCE_METRICS)


def test_layer2_reference_is_one_sided(qc_cfg: QCConfig) -> None:
    limit = qc_cfg.reference_z_limit
    df = curation.build_table([
        _rec("noisy", _scan({"snr": limit + 2})),  # SNR far below the clean reference
        _rec("better", _scan({"snr": -(limit + 10)})),  # far above: better, not a failure
        _rec("near", _scan({"snr": limit - 1})),
    ], dataclasses.replace(qc_cfg, classifier=False))
    by = df.set_index("subject")
    assert not by.loc["noisy", "qc_pass"] and by.loc["noisy", "qc_layer"] == "reference"
    assert "white-matter SNR" in by.loc["noisy", "qc_reason"] and "far lower than" in by.loc["noisy", "qc_reason"]
    assert by.loc["better", "qc_pass"] and by.loc["near", "qc_pass"]
    assert np.isnan(by.loc["near", "p_artifact"])  # classifier off


def test_flair_reference_is_contrast_matched() -> None:
    # The shipped reference holds real FLAIRs: a negative correlation with the T2 template is normal for FLAIR.
    ref = reference.load_reference()
    flair = ref[(ref["modality"] == "FLAIR") & (ref["metric"] == "correlation")].iloc[0]
    assert flair["median"] < 0 and flair["direction"] == 0
    t2 = ref[(ref["modality"] == "T2w") & (ref["metric"] == "correlation")].iloc[0]
    assert t2["median"] > 0 and t2["direction"] == 1


def test_layer3_site_outliers_need_a_known_site_with_enough_scans(qc_cfg: QCConfig) -> None:
    rng = np.random.default_rng(1)
    qc = dataclasses.replace(qc_cfg, classifier=False, outlier_rule_min_group=10)
    # Site A: 11 scans, one with SNR inside the reference (z 4 < 8) but 4 reference scales below its own site
    # (the planted reference scale of SNR is 2; the site's own spread, 0.2, is tighter and does not count).
    recs = [_rec(f"a{i}", {**_scan(), "snr": 20 + 0.2 * rng.normal()}) for i in range(10)]
    recs.append(_rec("a_low", {**_scan(), "snr": 12.0}))
    recs.append(_rec("a_high", {**_scan(), "snr": 28.0}))  # better than its site: no failure
    # Unknown site: same numbers, no rule. Small site B: no rule either.
    recs += [_rec(f"u{i}", {**_scan(), "snr": 20 + 0.2 * rng.normal()}, site="") for i in range(10)]
    recs.append(_rec("u_low", {**_scan(), "snr": 12.0}, site=""))
    recs += [_rec(f"b{i}", {**_scan(), "snr": 20.0 + i}, site="B") for i in range(3)] + [_rec("b_low", {**_scan(), "snr": 12.0}, site="B")]
    by = curation.build_table(recs, qc).set_index("subject")
    assert not by.loc["a_low", "qc_pass"] and by.loc["a_low", "qc_layer"] == "dataset"
    assert "site A" in by.loc["a_low", "qc_reason"] and "robust z 4.0" in by.loc["a_low", "qc_reason"]
    assert by.loc["a_high", "qc_pass"] and by.loc["a_high", "outlier_metrics"] == ""
    assert by.loc["u_low", "qc_pass"] and "snr" in by.loc["u_low", "outlier_metrics"]  # suggestion only
    assert by.loc["b_low", "qc_pass"]
    assert all(by.loc[f"a{i}", "qc_pass"] for i in range(10))


def test_layer3_rule_ignores_tight_protocols_and_anatomy(qc_cfg: QCConfig) -> None:
    """What made the rule reject 15 of 28 clean corpus scans: a metric that barely varies within a protocol
    (a difference of 0.1 % in brain coverage read as z 20) and a person unlike the others (template correlation
    of an atrophied brain). Neither rejects a scan now; the person stays visible as a suggestion."""
    qc = dataclasses.replace(qc_cfg, classifier=False, outlier_rule_min_group=5)
    rng = np.random.default_rng(3)
    recs = [_rec(f"a{i}", {**_scan(), "brain_coverage": 0.999 + 1e-5 * rng.normal(),
                           "correlation": 0.65 + 0.002 * rng.normal()}) for i in range(6)]
    recs.append(_rec("tight", {**_scan(), "brain_coverage": 0.998, "correlation": 0.65}))
    recs.append(_rec("atrophy", {**_scan(), "correlation": 0.33}))  # 5 reference scales below: z 5 < limit 8
    recs.append(_rec("noisy", {**_scan(), "snr": 12.0}))  # an acquisition outlier is still one
    by = curation.build_table(recs, qc).set_index("subject")
    assert by.loc["tight", "qc_pass"] and by.loc["tight", "outlier_metrics"] == ""
    assert by.loc["atrophy", "qc_pass"] and by.loc["atrophy", "outlier_metrics"] == "correlation"
    assert not by.loc["noisy", "qc_pass"] and by.loc["noisy", "qc_layer"] == "dataset"
    assert by.loc["noisy", "outlier_metrics"] == "snr"
    # Without the floor the tight protocol's 0.1 % is an outlier again, and rejected.
    floorless = curation.build_table(recs, dataclasses.replace(qc, outlier_scale_floor=0.0)).set_index("subject")
    assert not floorless.loc["tight", "qc_pass"] and "brain_coverage" in floorless.loc["tight", "failed_rules"]


def test_layer4_classifier_probability_and_operating_point(qc_cfg: QCConfig) -> None:
    recs = [_rec("clean", _scan()), _rec("bad", _scan({"air_signal": 5.0}))]
    # The reference alone (limit 10) keeps "bad" (z 5); the classifier trained on severe air signal does not.
    by = curation.build_table(recs, qc_cfg).set_index("subject")
    assert by.loc["clean", "p_artifact"] < 0.2 and by.loc["clean", "qc_pass"]
    assert by.loc["bad", "p_artifact"] > 0.8 and by.loc["bad", "qc_layer"] == "classifier"
    assert "probability of a severe artifact" in by.loc["bad", "qc_reason"]
    above = float(by.loc["bad", "p_artifact"]) + 1e-9
    strict = curation.build_table(recs, dataclasses.replace(qc_cfg, classifier_threshold=above)).set_index("subject")
    assert strict.loc["bad", "qc_pass"]


def test_refit_from_ratings_changes_the_decision_of_a_similar_scan(qc_cfg: QCConfig, tmp_path: Path) -> None:
    """A reviewer excludes scans with a pattern the shipped training never saw (a WM trend at z 4: inside the
    reference limit of 10); after the refit the classifier rejects an unrated scan with the same pattern."""
    from pipeline.cli import main
    from pipeline.core.config import Config, write_resolved_config
    from qc import review

    rng = np.random.default_rng(2)
    out = tmp_path / "out"
    # No site: only layers 1, 2 and 4 decide.
    recs = [_rec(f"c{i:02d}", _scan({"air_signal": rng.normal(0, 0.5), "wm_trend": rng.normal(0, 0.5)}), site="")
            for i in range(12)]
    recs += [_rec(f"h{i:02d}", _scan({"wm_trend": 4.0 + 0.3 * rng.normal()}), site="") for i in range(6)]
    recs.append(_rec("target", _scan({"wm_trend": 4.1}), site=""))
    df = curation.build_table(recs, qc_cfg)
    curation.write_table(df, out)
    assert df.set_index("subject").loc["target", "qc_pass"]  # kept before any rating
    cfg = Config(qc=qc_cfg)
    cfg_file = write_resolved_config(cfg, tmp_path)
    ratings = {r["path"]: {"decision": "exclude", "comment": "ringing"} for r in recs if r["subject"].startswith("h")}
    ratings.update({r["path"]: {"decision": "include", "comment": ""} for r in recs[:6]})
    review.save_ratings(out, ratings)
    assert main(["qc", "refit", str(out), "--config", str(cfg_file)]) == 0
    after = curation.read_table(out).set_index("subject")
    assert not after.loc["target", "qc_pass"] and "classifier" in after.loc["target", "qc_layer"]
    assert not after.loc["target", "include"]
    assert all(after.loc[f"c{i:02d}", "qc_pass"] for i in range(12))
    assert (out / "reports" / "group.html").is_file()
    # The ratings themselves still override.
    assert not any(after.loc[f"h{i:02d}", "include"] for i in range(6))


def test_rating_rows_labels() -> None:
    table = pd.DataFrame({"path": ["a", "b", "c", "d"], "modality": ["T1w", "T1w", "T1w", "bold"]})
    rows = classifier.rating_rows(table, {"a": {"decision": "exclude"}, "b": {"decision": "include"},
                                          "c": {"decision": ""}, "d": {"decision": "exclude"}})
    assert rows["path"].tolist() == ["a", "b"] and rows["label"].tolist() == [1, 0]


def test_reference_build_balances_sources() -> None:
    # Ten scans of one source at 1.0 and one scan each of two other sources at 2.0 and 3.0.
    df = pd.DataFrame({"modality": ["T1w"] * 12, "snr": [1.0] * 10 + [2.0, 3.0],
                       "source": ["big"] * 10 + ["s2", "s3"]})
    ref = reference.build_reference(df, source_column="source")
    row = ref[ref["metric"] == "snr"].iloc[0]
    assert row["median"] == 2.0 and row["n"] == 12 and row["n_sources"] == 3
    unbalanced = reference.build_reference(df).query("metric == 'snr'").iloc[0]
    assert unbalanced["median"] == 1.0
    z = reference.bad_z({"snr": 2.0 - 7 * row["scale"]}, "T1w", ref)
    assert z["snr"] == pytest.approx(7.0)


def test_site_shift_is_towards_degradation_only_and_capped() -> None:
    raw = pd.DataFrame({"snr": [-4.0, -5.0, -6.0], "wm_trend": [20.0, 30.0, 25.0],
                        "wm_gm_ratio": [-3.0, -2.0, -4.0], "cnr": [2.0, 3.0, 4.0]})
    shift = reference.site_shift(raw, "T1w", cap=10.0)
    assert shift["snr"] == -5.0  # lower SNR is worse: the site's median is allowed
    assert shift["wm_trend"] == 10.0  # capped at the reference limit
    assert shift["wm_gm_ratio"] == -3.0  # two-sided: the median with its sign
    assert shift["cnr"] == 0.0  # a site better than the reference earns no allowance


def test_site_shifts_need_a_known_site_with_enough_scans(tmp_path: Path) -> None:
    ref = reference.load_reference(_planted_reference(tmp_path / "ref.tsv"))
    low = _scan({"wm_trend": 4.0})
    df = pd.DataFrame([{"modality": "T1w", **low}] * 9)
    site = pd.Series(["A"] * 5 + ["B"] * 3 + [None])
    shift = reference.site_shifts(df, ref, ["wm_trend", "snr"], site, min_group=5, cap=10.0)
    assert shift.loc[:4, "wm_trend"].tolist() == pytest.approx([4.0] * 5) and (shift.loc[:4, "snr"] == 0).all()
    assert (shift.loc[5:, "wm_trend"] == 0).all()  # B has 3 scans; the last row has no site
    z = reference.z_frame(df, ref, ["wm_trend"], shift=shift)["wm_trend"]
    assert z.loc[:4].tolist() == pytest.approx([0.0] * 5) and z.loc[5:].tolist() == pytest.approx([4.0] * 4)
    assert (reference.site_shifts(df, ref, ["wm_trend"], site, min_group=0, cap=10.0) == 0).all().all()


def test_training_cohort_is_the_other_clean_scans_of_the_source_plus_the_row(tmp_path: Path) -> None:
    ref = reference.load_reference(_planted_reference(tmp_path / "ref.tsv"))
    rows = [{"case": f"a{i}__clean__clean", "source": "A", "severity": "clean", "modality": "T1w",
             **_scan({"wm_trend": 2.0 + i})} for i in range(5)]  # z 2..6, median 4
    rows.append({"case": "a0__bias__severe", "source": "A", "severity": "severe", "modality": "T1w",
                 **_scan({"wm_trend": 30.0})})
    rows.append({"case": "b0__clean__clean", "source": "B", "severity": "clean", "modality": "T1w", **_scan()})
    table = pd.DataFrame(rows)
    shift = classifier.cohort_shifts(table, ref, min_group=5, cap=10.0)["wm_trend"]
    assert shift.iloc[0] == pytest.approx(4.0)  # a0 among a1..a4: z 2,3,4,5,6
    assert shift.iloc[5] == pytest.approx(5.0)  # the copy replaces a0: z 3,4,5,6,30
    assert shift.iloc[6] == 0.0  # source B: one scan


def test_style_transplant_moves_each_row_into_every_other_source_style(tmp_path: Path) -> None:
    ref = reference.load_reference(_planted_reference(tmp_path / "ref.tsv"))

    def row(source: str, severity: str, z: dict[str, float]) -> dict:
        return {"source": source, "severity": severity, "modality": "T1w", "label": int(severity == "severe"),
                **_scan(z)}

    table = pd.DataFrame([
        row("A", "clean", {"wm_trend": 0.0}), row("A", "clean", {"wm_trend": 2.0}),  # style: wm_trend 1
        row("A", "severe", {"air_signal": 15.0}),
        row("B", "clean", {"wm_trend": 6.0}),  # style: wm_trend 6
        row("C", "clean", {"air_signal": 3.0}),  # style: air_signal 3
        row("D", "severe", {"air_signal": 20.0}),  # no clean scan: no style, never moved
    ])
    raw = reference.raw_z_frame(table, ref, classifier.FEATURE_METRICS)
    moved, rows, weight = classifier.style_transplants(table, raw)
    assert sorted(rows.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # each row of A, B, C into the 2 other styles
    assert weight.tolist() == pytest.approx([0.5] * 10)
    severe_in_b = moved[(rows == 2) & (moved["wm_trend"].to_numpy() > 3)].iloc[0]
    assert severe_in_b["wm_trend"] == pytest.approx(5.0) and severe_in_b["air_signal"] == pytest.approx(15.0)
    b_in_c = moved[(rows == 3) & (moved["air_signal"].to_numpy() > 1)].iloc[0]
    assert b_in_c["air_signal"] == pytest.approx(3.0) and b_in_c["wm_trend"] == pytest.approx(0.0)
    # Without a source column nothing is moved, and the fit still works (with a warning).
    bare = table.drop(columns="source")
    assert len(classifier.style_transplants(bare, raw)[1]) == 0
    for t in (table, bare):
        model = classifier.fit(t, ref)
        assert classifier.predict(model, t, ref).shape == (len(t),)


def test_a_contrast_enhanced_scan_is_judged_on_contrast_free_metrics_only(qc_cfg: QCConfig) -> None:
    """Gadolinium moves tissue contrast and template similarity far from plain T1w; that is not an artifact. The
    contrast-free detectors still judge the scan."""
    enhanced = _scan({"cjv": 20.0, "correlation": 15.0, "cnr": 9.0})
    recs = [_rec("plain", enhanced), {**_rec("gd", enhanced), "ce": "gadolinium"},
            {**_rec("gdbad", _scan({"cjv": 20.0, "air_signal": 25.0})), "ce": "gadolinium"}]
    by = curation.build_table(recs, qc_cfg).set_index("subject")
    assert not by.loc["plain", "qc_pass"] and "reference" in by.loc["plain", "qc_layer"]
    assert by.loc["gd", "qc_pass"], by.loc["gd", "qc_reason"]
    assert by.loc["gd", "ce"] == "gadolinium" and by.loc["gd", "cjv"] == pytest.approx(enhanced["cjv"])  # reported
    assert not by.loc["gdbad", "qc_pass"] and "air" in by.loc["gdbad", "qc_reason"]
    judged = reference.contrast_judged(by.reset_index())
    assert judged.loc[judged["subject"] == "gd", "cjv"].isna().all()
    assert judged.loc[judged["subject"] == "gd", "air_signal"].notna().all()
    assert judged.loc[judged["subject"] == "plain", "cjv"].notna().all()


def test_layer3_suggestions_need_a_known_spread_for_anatomical_scans(qc_cfg: QCConfig) -> None:
    """The N4 field's median has no reference spread: a site's tight median does not make a suggestion on an
    anatomical scan (at the corpus' groups it flagged 2 clean FLAIRs); BOLD metrics, which have no reference at all,
    still do."""
    qc = dataclasses.replace(qc_cfg, classifier=False)
    rng = np.random.default_rng(4)
    recs = [_rec(f"a{i}", {**_scan(), "inu_med": 0.5 + 0.001 * rng.normal()}) for i in range(6)]
    recs.append(_rec("odd", {**_scan(), "inu_med": 0.6}))
    bold = [_rec(f"b{i}", {"tsnr": 50 + rng.normal(), "fd_mean": 0.1, "fd_max": 0.3, "fd_perc": 0.0, "n_volumes": 200.0},
                 modality="bold") for i in range(6)]
    bold.append(_rec("b_odd", {"tsnr": 30.0, "fd_mean": 0.1, "fd_max": 0.3, "fd_perc": 0.0, "n_volumes": 200.0},
                     modality="bold"))
    by = curation.build_table(recs + bold, qc).set_index("subject")
    assert by.loc["odd", "outlier_metrics"] == "" and by.loc["odd", "qc_pass"]
    assert "tsnr" in by.loc["b_odd", "outlier_metrics"]
