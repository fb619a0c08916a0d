"""Start the gnlorp studio in a browser: `python app.py`, then open http://127.0.0.1:7860 and press Start.

It binds 127.0.0.1 and makes no share link unless asked. Every file it writes goes under its runs folder
(uploads, run folders, exports, its own logs and Gradio's temp files) or presets/ when a preset is saved.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The gnlorp studio (Gradio).")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--auth", metavar="USER:PASSWORD", help="ask for this user name and password")
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    parser.add_argument("--runs-dir", default="runs", help="folder for runs, uploads and exports (default runs/)")
    parser.add_argument("--allow-dir", action="append", default=[], metavar="FOLDER",
                        help="another folder whose models and data the studio may read (repeatable)")
    args = parser.parse_args(argv)
    if args.auth is not None and (":" not in args.auth or not all(args.auth.split(":", 1))):
        parser.error("--auth takes USER:PASSWORD, both non-empty")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs_dir = Path(args.runs_dir).resolve()
    # Gradio reads these when it is imported: its uploads and caches stay in the runs folder, and no telemetry.
    os.environ["GRADIO_TEMP_DIR"] = str(runs_dir / ".studio" / "gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ui import CSS, Studio, build_studio, warm_up

    studio = Studio.create(runs_dir, PROJECT, [Path(d) for d in args.allow_dir], Path.cwd())
    page = build_studio(studio)
    # SIGTERM ends the studio like Ctrl-C, so a running training is stopped with a checkpoint, not orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    try:
        page.queue(default_concurrency_limit=4).launch(
            server_name=args.host, server_port=args.port, share=args.share, auth=auth, css=CSS,
            footer_links=["api"], ssr_mode=False, show_error=False, prevent_thread_lock=True,
        )
        warm_up(studio)  # after the page is served, so the first estimate's imports do not delay it
        page.block_thread()
    finally:
        studio.jobs.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
