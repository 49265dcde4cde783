"""A screenshot of the chat page after an answer, for the README.

Starts `mlx-gemma serve` on 127.0.0.1 (the embedded 270M, plus any --adapter NAME=DIR: with one,
the page is put in compare mode, base and adapter side by side), opens the page in Debian's
headless chromium through Playwright, asks a question and saves the page once the answer is
complete.

    python benchmarks/chat_page.py --out benchmarks/chat-page.png [--adapter zh=adapters/gemma-3-270m-zh]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

from serve import free_port, wait_up  # benchmarks/serve.py: the same server start-up

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/chat-page.png")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--question", default="用三句话介绍一下长城。")
    ap.add_argument("--system", default="You are a helpful assistant.")
    ap.add_argument("--max-tokens", type=int, default=120)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    port = free_port()
    cmd = [sys.executable, "-m", "mlx_gemma.cli", "serve", "--model", args.model, "--port", str(port),
           "--log-level", "warning"] + [x for a in args.adapter for x in ("--adapter", a)]
    proc = subprocess.Popen(cmd)
    try:
        wait_up(port, proc)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 720}, device_scale_factor=1)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("document.querySelectorAll('#model-a option').length > 0")
            if args.adapter:
                page.check("#compare")
                page.select_option("#model-b", args.adapter[0].split("=", 1)[0])
            page.fill("#system", args.system)
            page.fill("#temperature", "0")
            page.dispatch_event("#temperature", "input")
            page.fill("#max-tokens", str(args.max_tokens))
            page.dispatch_event("#max-tokens", "input")
            page.fill("#prompt", args.question)
            page.click("#send")
            page.wait_for_function("!document.querySelector('.msg[data-state=streaming]') && "
                                   "document.querySelectorAll('.msg.assistant').length > 0", timeout=600_000)
            page.screenshot(path=args.out)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
