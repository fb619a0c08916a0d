"""Start the gnlorp studio in a browser: `python app.py`, then open http://127.0.0.1:7860 and press Start.

It binds 127.0.0.1 and makes no share link unless asked. Every file it writes goes under its runs folder
(uploads, run folders, exports, its own logs and Gradio's temp files) or presets/ when a preset is saved. Of the
runs folder it serves only exports/ (the Export tab's Download) and Gradio's own temp files.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent
AUTH_ENV = "GNLORP_AUTH"  # USER:PASSWORD from the environment keeps the password out of `ps` and shell history


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The gnlorp studio (Gradio).")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--auth", metavar="USER:PASSWORD", default=os.environ.get(AUTH_ENV),
                        help=f"ask for this user name and password (or set {AUTH_ENV}, which `ps` does not show); "
                        "required with --share or a --host other than this machine")
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    parser.add_argument("--runs-dir", default="runs", help="folder for runs, uploads and exports (default runs/)")
    parser.add_argument("--allow-dir", action="append", default=[], metavar="FOLDER",
                        help="another folder whose models and data the studio may read (repeatable)")
    args = parser.parse_args(argv)
    if args.auth is not None and (":" not in args.auth or not all(args.auth.split(":", 1))):
        parser.error("--auth takes USER:PASSWORD, both non-empty")
    if args.auth is None and (args.share or not is_loopback(args.host)):
        exposed = "--share makes a public link" if args.share else f"--host {args.host} lets other machines connect"
        parser.error(f"{exposed}, and anyone who reaches the studio can train, read and write its folders: add "
                     f"--auth USER:PASSWORD (or set {AUTH_ENV}), ideally behind TLS (see docs/SECURITY.md)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs_dir = Path(args.runs_dir).resolve()
    # Gradio reads these when it is imported: its uploads and caches stay in the runs folder, and no telemetry.
    os.environ["GRADIO_TEMP_DIR"] = str(runs_dir / ".studio" / "gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from gradio import set_static_paths

    from gnlorp.runs import add_secret
    from ui import CSS, Studio, build_studio, warm_up

    studio = Studio.create(runs_dir, PROJECT, [Path(d) for d in args.allow_dir], Path.cwd())
    # The Export tab's Download sends files from exports/ where they lie (a multi-GB GGUF is not copied into
    # Gradio's cache); nothing else of the runs folder is served, and links out of exports/ are refused.
    studio.exports_dir.mkdir(parents=True, exist_ok=True)
    set_static_paths([studio.exports_dir])
    page = build_studio(studio)
    # SIGTERM ends the studio like Ctrl-C, so a running training is stopped with a checkpoint, not orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    if auth:
        add_secret(auth[1])  # never shown in the page, the logs or the run store
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
