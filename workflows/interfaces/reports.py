"""The per-subject QC report as a node of the participant graph, so it runs on the workers with the scans."""

from __future__ import annotations

import logging

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    SimpleInterface,
    TraitedSpec,
    traits,
)

__all__ = ["WriteSubjectReport", "write_report_limited"]

LOG = logging.getLogger(__name__)


def write_report_limited(output_dir: str, subject: str, cfg, num_threads: int = 1) -> str:
    """Write ``sub-<subject>``'s report (:func:`qc.group.write_subject_report`) with at most ``num_threads`` threads.

    The report's classifier (scikit-learn's OpenMP) would otherwise start one thread per core next to the other
    workers' nodes; its results do not depend on the thread count. A failure is logged and never raised: a
    report must never cost the derivatives.

    Returns
    -------
    str
        The report's path, or ``""`` when it could not be written.
    """
    from threadpoolctl import threadpool_limits

    from qc.group import write_subject_report

    try:
        if cfg.qc.classifier:
            # threadpoolctl limits only the runtimes already loaded: load scikit-learn's OpenMP first.
            import sklearn.ensemble  # noqa: F401
        with threadpool_limits(limits=max(1, int(num_threads))):
            return str(write_subject_report(output_dir, subject, cfg))
    except Exception as exc:  # a report must never cost the derivatives
        LOG.warning("could not write the report of sub-%s: %s", subject, exc)
        return ""


class _ReportInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True, desc="BIDS-Derivatives root")
    subject = traits.Str(mandatory=True, desc="subject label, without sub-")
    config = traits.Dict(mandatory=True, desc="the resolved configuration (pipeline.core.config.config_to_dict)")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="threads of the report's numerical libraries")
    published = traits.List(traits.Any, desc="outputs of the subject's derivative sinks (only orders the node last)")


class _ReportOutputSpec(TraitedSpec):
    out_report = traits.Str(desc="path of the report; empty when it could not be written (logged)")


class WriteSubjectReport(SimpleInterface):
    """Write ``OUTPUT_DIR/reports/sub-<subject>.html`` once the subject's derivatives are published.

    Never fails: a report error is logged (as the participant level always did) so that it cannot turn a
    finished subject into a failed one.
    """

    input_spec = _ReportInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        from pipeline.core.config import Config, from_dict

        cfg = from_dict(Config, dict(self.inputs.config))
        self._results["out_report"] = write_report_limited(self.inputs.output_dir, self.inputs.subject, cfg,
                                                           self.inputs.num_threads)
        return runtime
