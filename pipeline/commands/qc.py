"""``neurocurate qc``: group QC of a derivatives folder, and the reviewer's actions on its curation.

``qc OUTPUT_DIR`` measures whatever derivatives OUTPUT_DIR holds (preprocessed scans, ROI series,
imported series) and writes the curation table and the reports; no BIDS folder is needed.
``qc review OUTPUT_DIR`` serves the group report on 127.0.0.1 and saves each include/exclude rating
into ``OUTPUT_DIR/curation/ratings.json`` and the curation table at once. ``qc import-ratings
OUTPUT_DIR FILE`` merges a ratings file exported from the report opened without the server.
"""

from __future__ import annotations

import argparse

HELP = "group QC of OUTPUT_DIR (curation table + reports), or review it: qc OUTPUT_DIR | qc review OUTPUT_DIR | qc import-ratings OUTPUT_DIR FILE"

# action -> (extra positional names, help)
ACTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "review": ((), "serve the group report on 127.0.0.1 for rating scans"),
    "import-ratings": (("FILE",), "merge a ratings.json exported from the group report into the curation table"),
    "refit": ((), "refit the artifact classifier with the reviewer ratings and re-decide every scan"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``qc OUTPUT_DIR`` or ``qc ACTION OUTPUT_DIR ...``."""
    parser.usage = ("neurocurate qc OUTPUT_DIR [--config FILE] [--bids-dir BIDS_DIR]\n"
                    + "".join(f"       neurocurate qc {a} OUTPUT_DIR {' '.join(extra)}{' [--port PORT]' if a == 'review' else ''}\n"
                              for a, (extra, _) in ACTIONS.items()))
    parser.epilog = "actions: " + "; ".join(f"{a}: {h}" for a, (_, h) in ACTIONS.items())
    parser.add_argument("words", nargs="+", metavar="OUTPUT_DIR | ACTION OUTPUT_DIR ...",
                        help="derivatives root to QC, or an action and its arguments")
    parser.add_argument("--config", help="TOML config; the [qc] and [templates] sections apply (group QC)")
    parser.add_argument("--bids-dir", help="the raw BIDS dataset, checked when given (group QC)")
    parser.add_argument("--port", type=int, default=8765, help="review: port on 127.0.0.1 (default 8765; 0 = any free port)")


def _parse(parser_words: list[str]) -> tuple[str, list[str]]:
    from pipeline.core.errors import NeurocurateError

    head, rest = parser_words[0], parser_words[1:]
    if head in ACTIONS:
        extra = ACTIONS[head][0]
        if len(rest) != 1 + len(extra):
            raise NeurocurateError(f"qc {head}: expected OUTPUT_DIR {' '.join(extra)}".rstrip())
        return head, rest
    if rest:
        raise NeurocurateError(f"qc: unexpected argument(s) {' '.join(rest)}; actions: {', '.join(ACTIONS)}")
    return "group", [head]


def run(args: argparse.Namespace) -> int:
    """Run group QC or the chosen action; exit 0 (3 when some scans could not be measured)."""
    from pipeline.stages import qc as stage

    action, words = _parse(args.words)
    if action == "group":
        from pipeline.core.config import load_config

        return stage.run_qc(words[0], load_config(args.config), bids_dir=args.bids_dir)
    if action == "import-ratings":
        stage.import_ratings(words[0], words[1])
        return 0
    if action == "refit":
        from pipeline.core.config import load_config

        stage.refit_classifier(words[0], load_config(args.config))
        return 0
    server = stage.review_server(words[0], args.port)
    host, port = server.server_address[:2]
    print(f"review server on http://{host}:{port}/ (Ctrl-C to stop); ratings go to {words[0]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
