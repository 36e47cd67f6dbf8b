"""Round trip of one study through the MONAI Label app: HTTP infer request -> label NIfTI received.

    python scripts/benchmark_monailabel.py --env .monailabel-env --checkpoint runs/bench_brain/model.pt \
        --study ../shared/data/brats2015/pat0003/flair.nii.gz

Starts ``monailabel start_server`` on 127.0.0.1 with a studies folder holding the one study, waits for it,
then times ``POST /infer/multiad?image=...&output=image`` three times (each a full bundle inference:
reading, slices through the network, NIfTI written and sent). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default=os.path.join(REPO, ".monailabel-env"))
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    studies = tempfile.mkdtemp(prefix="studies_")
    shutil.copy(args.study, os.path.join(studies, "study.nii.gz"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        os.path.join(args.env, "bin", "monailabel"), "start_server", "--app", os.path.join(REPO, "apps", "monailabel"),
        "--studies", studies, "--conf", "model", os.path.abspath(args.checkpoint), "--host", "127.0.0.1", "--port", str(port),
    ]
    environment = {**os.environ, "PATH": os.path.join(args.env, "bin") + os.pathsep + os.environ["PATH"]}
    start = time.perf_counter()
    server = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                urllib.request.urlopen(f"{base}/info/", timeout=5).read()
                break
            except OSError:
                time.sleep(0.5)
        report = {"server_start_seconds": round(time.perf_counter() - start, 1), "round_trips_seconds": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            request = urllib.request.Request(f"{base}/infer/multiad?image=study&output=image", data=b"", method="POST")
            body = urllib.request.urlopen(request, timeout=600).read()
            report["round_trips_seconds"].append(round(time.perf_counter() - start, 2))
        report["label_bytes"] = len(body)
        report["study"] = os.path.abspath(args.study)
        print(json.dumps(report, indent=2))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        shutil.rmtree(studies, ignore_errors=True)


if __name__ == "__main__":
    main()
