"""``neurocurate qc``: review the curation locally.

``qc review OUTPUT_DIR`` serves the group report on 127.0.0.1 and saves each
include/exclude rating into ``OUTPUT_DIR/curation/ratings.json`` and the
curation table at once. ``qc import-ratings OUTPUT_DIR FILE`` merges a
ratings file exported from the report opened without the server.
"""

from __future__ import annotations

import argparse

HELP = "review the QC curation: local review server (127.0.0.1) or import exported ratings"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``review`` and ``import-ratings`` actions."""
    sub = parser.add_subparsers(dest="qc_action", metavar="ACTION", required=True)
    review = sub.add_parser("review", help="serve the group report on 127.0.0.1 for rating scans")
    review.add_argument("output_dir", metavar="OUTPUT_DIR", help="derivatives root with curation/ and reports/")
    review.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765; 0 = any free port)")
    imp = sub.add_parser("import-ratings", help="merge an exported ratings.json into the curation table")
    imp.add_argument("output_dir", metavar="OUTPUT_DIR", help="derivatives root with curation/")
    imp.add_argument("file", metavar="FILE", help="ratings JSON exported from the group report")


def _rerender(output_dir, subjects: set[str]) -> None:
    """Refresh the group report and the rated subjects' reports with the config of the last group run."""
    from pathlib import Path

    from pipeline.core.config import load_config
    from qc.curation import read_table
    from qc.group import crash_log_subjects, write_group_report, write_subject_report

    output_dir = Path(output_dir)
    saved = output_dir / "curation" / "neurocurate_config.toml"
    cfg = load_config(saved if saved.is_file() else None)
    write_group_report(output_dir, read_table(output_dir), cfg, sorted(crash_log_subjects(output_dir)))
    for subject in sorted(subjects):
        write_subject_report(output_dir, subject, cfg)


def run(args: argparse.Namespace) -> int:
    """Run the chosen action; exit 0 on success."""
    from pathlib import Path

    output_dir = Path(args.output_dir)
    if args.qc_action == "import-ratings":
        from qc.curation import read_table
        from qc.review import import_ratings, load_ratings

        n = import_ratings(output_dir, args.file)
        df = read_table(output_dir)
        rated = set(load_ratings(output_dir))
        _rerender(output_dir, set(df.loc[df["path"].isin(rated), "subject"]))
        print(f"imported {n} rating(s); {int(df['include'].sum())}/{len(df)} scans included")
        return 0

    from qc.review import make_server

    server = make_server(output_dir, args.port)
    host, port = server.server_address[:2]
    print(f"review server on http://{host}:{port}/ (Ctrl-C to stop); ratings go to {output_dir / 'curation'}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
