"""Curation rules, thresholds from the config, robust outliers, overrides and the ratings store."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import ConfigError, QCConfig, load_config
from pipeline.core.errors import InputError
from qc import curation, review


def _medians(modality: str) -> dict[str, float]:
    from qc.reference import load_reference

    ref = load_reference()
    ref = ref[ref["modality"] == modality]
    return dict(zip(ref["metric"], ref["median"].astype(float), strict=True))


def _rec(subject: str, modality: str = "T1w", site: str = "A", **metrics: float) -> dict:
    """A scan whose metrics sit at the medians of the shipped clean reference."""
    return {"subject": subject, "modality": modality, "site": site,
            "path": f"sub-{subject}/anat/sub-{subject}_{modality}.nii.gz", **_medians(modality), **metrics}


def test_rules_come_from_the_modality_section() -> None:
    qc = QCConfig()
    rules = curation.rules_for("T1w", qc)
    assert ("brain_coverage", "min", qc.t1w.min_brain_coverage) in rules
    assert ("wm_gm_ratio", "min", 1.0) in rules
    assert ("csf_gm_ratio", "max", 1.0) in curation.rules_for("FLAIR", qc)
    assert curation.rules_for("FLAIR", qc) != rules
    assert ("n_volumes", "min", 100.0) in curation.rules_for("timeseries", qc)
    with pytest.raises(ValueError, match="no QC thresholds"):
        curation.rules_for("DWI", qc)


def test_partial_toml_keeps_modality_defaults(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("[qc.flair]\nmin_brain_coverage = 0.5\n")
    cfg = load_config(toml)
    assert cfg.qc.flair.min_brain_coverage == 0.5
    # A FLAIR table that sets one key must not fall back to the T1w signature.
    assert cfg.qc.flair.max_csf_gm_ratio == QCConfig().flair.max_csf_gm_ratio
    toml.write_text("[qc.t1w]\nmin_snrr = 3.0\n")
    with pytest.raises(ConfigError, match="min_snrr"):
        load_config(toml)


def test_any_failing_rule_fails_and_nan_skips() -> None:
    qc = QCConfig()
    ok, failed = curation.evaluate_rules(_rec("01"), "T1w", qc)
    assert ok and failed == []
    ok, failed = curation.evaluate_rules(_rec("01", brain_coverage=0.3, wm_gm_ratio=0.7), "T1w", qc)
    assert not ok and len(failed) == 2 and failed[0].startswith("brain_coverage=0.3<")
    ok, _ = curation.evaluate_rules(_rec("01", brain_coverage=float("nan")), "T1w", qc)
    assert ok


def test_build_table_columns_and_overrides() -> None:
    # Classifier off: the ratings below would also become its labels (see test_qc_layers for that).
    qc = dataclasses.replace(QCConfig(), classifier=False)
    recs = [_rec("01"), _rec("02", brain_coverage=0.1), _rec("03", modality="T2w")]
    ratings = {recs[0]["path"]: {"decision": "exclude", "comment": "ringing"},
               recs[1]["path"]: {"decision": "include", "comment": ""}}
    df = curation.build_table(recs, qc, ratings)
    assert list(df.columns[: len(curation.ENTITY_COLUMNS)]) == list(curation.ENTITY_COLUMNS)
    assert list(df.columns[-len(curation.TRAILING_COLUMNS):]) == list(curation.TRAILING_COLUMNS)
    assert df["qc_pass"].tolist() == [True, False, True]
    assert df["include"].tolist() == [False, True, True]
    assert df["override"].tolist() == ["exclude", "include", ""]
    assert df.loc[0, "override_comment"] == "ringing"
    assert "brain_coverage=0.1<" in df.loc[1, "failed_rules"] and "absolute" in df.loc[1, "qc_layer"]
    assert df["p_artifact"].isna().all()
    with_clf = curation.build_table(recs, QCConfig())
    assert with_clf["p_artifact"].between(0, 1).all() and with_clf["qc_pass"].tolist() == [True, False, True]
    with pytest.raises(ValueError, match="lacks"):
        curation.build_table([{"subject": "x"}], qc)
    with pytest.raises(ValueError, match="decision"):
        curation.apply_overrides(df, {recs[0]["path"]: {"decision": "maybe"}})


def test_mad_outliers_per_modality_and_site() -> None:
    from qc.reference import load_reference

    ref = load_reference()
    air = ref[(ref["modality"] == "T1w") & (ref["metric"] == "air_signal")].iloc[0]
    med, scale = float(air["median"]), float(air["scale"])
    rng = np.random.default_rng(0)
    recs = [_rec(f"a{i}", air_signal=med * (1 + 0.01 * rng.normal())) for i in range(8)]
    recs.append(_rec("a9", air_signal=med + 4 * scale))  # 4 reference scales above its site (reference z 4 < 8)
    recs.append(_rec("a10", air_signal=0.0))  # less signal in the air: better, not an outlier
    recs.append(_rec("a11", air_signal=med + 0.5 * scale))  # far above the site's own spread, within the reference's
    recs += [_rec(f"b{i}", site="B", air_signal=med + 2 * i * scale) for i in range(2)]
    recs.append(_rec("b2", site="B", air_signal=med + 4 * scale))  # small site: no suggestion
    df = curation.build_table(recs, QCConfig()).set_index("subject")
    flagged = df["outlier_metrics"].to_dict()
    assert flagged["a9"] == "air_signal" and flagged["a10"] == "" and flagged["a11"] == ""
    assert all(flagged[f"a{i}"] == "" for i in range(8))
    assert all(flagged[f"b{i}"] == "" for i in range(3))
    # Site A (11 scans) is a population for the rule (outlier_rule_min_group = 10): a9 is rejected, site named.
    assert "dataset" in df.loc["a9", "qc_layer"] and "site A" in df.loc["a9", "qc_reason"]
    assert "dataset" not in df.loc["a11", "qc_layer"] and "dataset" not in df.loc["b2", "qc_layer"]


def test_table_roundtrip(tmp_path: Path) -> None:
    df = curation.build_table([_rec("01", fber=float("nan")), _rec("02")], QCConfig())
    parquet, tsv = curation.write_table(df, tmp_path)
    back = curation.read_table(tmp_path)
    pd.testing.assert_frame_equal(back, df)
    assert "n/a" in tsv.read_text()
    with pytest.raises(InputError, match="no curation table"):
        curation.read_table(tmp_path / "elsewhere")


def test_ratings_store_and_import(tmp_path: Path) -> None:
    recs = [_rec("01"), _rec("02")]
    curation.write_table(curation.build_table(recs, QCConfig()), tmp_path)
    assert review.set_rating(tmp_path, recs[0]["path"], "exclude", "ghosting", "ana") is False
    stored = json.loads(review.ratings_path(tmp_path).read_text())["ratings"][recs[0]["path"]]
    assert stored["decision"] == "exclude" and stored["reviewer"] == "ana" and stored["time"]
    assert not curation.read_table(tmp_path).set_index("path").loc[recs[0]["path"], "include"]
    with pytest.raises(InputError, match="not a scan"):
        review.set_rating(tmp_path, "sub-x/anat/x.nii.gz", "exclude")
    with pytest.raises(InputError, match="decision"):
        review.set_rating(tmp_path, recs[0]["path"], "drop")
    # An exported list-style file overrides the stored rating.
    export = tmp_path / "export.json"
    export.write_text(json.dumps([{"path": recs[0]["path"], "decision": "include", "comment": "ok after all"}]))
    assert review.import_ratings(tmp_path, export) == 1
    row = curation.read_table(tmp_path).set_index("path").loc[recs[0]["path"]]
    assert row["override"] == "include" and row["override_comment"] == "ok after all" and row["include"]
    export.write_text("{not json")
    with pytest.raises(InputError, match="not a JSON ratings file"):
        review.import_ratings(tmp_path, export)
    export.write_text(json.dumps({"something": 1}))
    with pytest.raises(InputError, match="expected"):
        review.import_ratings(tmp_path, export)
    review.ratings_path(tmp_path).write_text("[")
    with pytest.raises(InputError, match="ratings file is not valid JSON"):
        review.load_ratings(tmp_path)
