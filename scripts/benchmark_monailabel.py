"""Round trip of one study through the MONAI Label app: HTTP infer request -> label NIfTI received.

    python scripts/benchmark_monailabel.py --env .monailabel-env --checkpoint runs/bench_brain/model.pt \
        --study ../shared/data/brats2015/pat0003/flair.nii.gz

Starts ``monailabel start_server`` on 127.0.0.1 with a studies folder holding the one study, waits for it,
then times ``POST /infer/multiad?image=...&output=image`` ``--repeats`` times (each a full bundle inference:
reading, slices through the network, NIfTI written and sent; the network itself is built and loaded once, at the
server's start; with the ``auto`` or ``onnx`` runtime on a CPU its ONNX export is made at the first start on a model
and read from the cache, ``--cache_dir``, at later starts). Prints JSON: the server start, the first and second
request's round trip, all round trips, the CPU seconds the server's processes used for each request (Linux
``/proc``; steadier than wall time when other jobs share the cores), and how many times the server built the
network (from a last ``output=json`` request).
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


def session_cpu_seconds(session_id: int) -> float:
    """User + system CPU seconds of the live processes of a session (the server and its children)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id:  # fields after the name: state, ppid, pgrp, session, ..., utime (12), stime (13)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default=os.path.join(REPO, ".monailabel-env"))
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runtime", default="auto", help="the app's --conf runtime: auto (its default), torch, or onnx")
    parser.add_argument("--cache_dir", default=None, help="MULTIAD_CACHE_DIR of the server (where ONNX exports are kept)")
    parser.add_argument("--settings", default=None, help="the app's --conf settings: a JSON object of bundle keys, without spaces")
    args = parser.parse_args()
    studies = tempfile.mkdtemp(prefix="studies_")
    shutil.copy(args.study, os.path.join(studies, "study.nii.gz"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        os.path.join(args.env, "bin", "monailabel"), "start_server", "--app", os.path.join(REPO, "apps", "monailabel"),
        "--studies", studies, "--conf", "model", os.path.abspath(args.checkpoint), "--conf", "runtime", args.runtime,
        "--host", "127.0.0.1", "--port", str(port),
    ]
    if args.settings:
        command += ["--conf", "settings", args.settings]
    environment = {**os.environ, "PATH": os.path.join(args.env, "bin") + os.pathsep + os.environ["PATH"]}
    if args.cache_dir:
        environment["MULTIAD_CACHE_DIR"] = os.path.abspath(args.cache_dir)
    start = time.perf_counter()
    server = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                urllib.request.urlopen(f"{base}/info/", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"the MONAI Label server stopped at start (exit code {server.returncode})")
                time.sleep(0.5)
        report = {"server_start_seconds": round(time.perf_counter() - start, 1), "round_trips_seconds": [], "server_cpu_seconds": []}
        for _ in range(max(2, args.repeats)):
            start, cpu = time.perf_counter(), session_cpu_seconds(server.pid)
            request = urllib.request.Request(f"{base}/infer/multiad?image=study&output=image", data=b"", method="POST")
            body = urllib.request.urlopen(request, timeout=600).read()
            report["round_trips_seconds"].append(round(time.perf_counter() - start, 2))
            report["server_cpu_seconds"].append(round(session_cpu_seconds(server.pid) - cpu, 2))
        report["first_request_seconds"], report["second_request_seconds"] = report["round_trips_seconds"][:2]
        report["label_bytes"] = len(body)
        request = urllib.request.Request(f"{base}/infer/multiad?image=study&output=json", data=b"", method="POST")
        report["network_builds"] = json.loads(urllib.request.urlopen(request, timeout=600).read()).get("network_builds")
        report["study"] = os.path.abspath(args.study)
        report["runtime"] = args.runtime
        report["cache_dir"] = args.cache_dir
        report["settings"] = args.settings
        print(json.dumps(report, indent=2))
    finally:
        if server.poll() is None:  # a server that stopped at start has no process group left to end
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        shutil.rmtree(studies, ignore_errors=True)


if __name__ == "__main__":
    main()
