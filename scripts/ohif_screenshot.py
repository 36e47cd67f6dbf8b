"""Screenshot of MONAI Label's bundled OHIF viewer showing a generated study with its Multi-AD anomaly SEG.

    python scripts/ohif_screenshot.py [--work_dir /tmp/multiad_ohif] [--output docs/images/ohif_anomaly_seg.png]

Generates phantom brain volumes and trains a tiny model on them (a few CPU minutes; reused from ``--work_dir``
when there), writes a held-out case as a DICOM MR series and uploads it to a local Orthanc
(``apps/orthanc/orthanc.json``), starts MONAI Label with that Orthanc as its DICOMweb studies, runs ``multiad``
on the series and saves the mask as the ``final`` label (MONAI Label writes it into Orthanc as a DICOM SEG),
then opens MONAI Label's OHIF (``/ohif/viewer?StudyInstanceUIDs=...``) in headless Chromium, loads the SEG
as a reader does (double-click its thumbnail, answer *Yes*), jumps to the segment and saves the screenshot.
Both servers and Chromium are stopped on exit, also on error. Only generated data is used.

Needs: Debian ``chromium``, ``orthanc`` and ``orthanc-dicomweb``; the MONAI Label environment
``.monailabel-env`` with dcmqi (``.ci/run`` builds it; another one with ``--monailabel_env``); this package
installed in the Python that runs the script. Chromium is driven over ``--remote-debugging-pipe`` with the
standard library only (no browser download, no driver package).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import nibabel as nib
import numpy as np
import pydicom
import requests

from multiad_monai.apps.cli import main as multiad
from multiad_monai.data import make_demo_volumes
from multiad_monai.data.dicom_series import write_dicom_series
from multiad_monai.data.dicomweb import store_dicomweb_instances

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # apps/orthanc/orthanc.json loads it
VIEWPORT = (1600, 1000)
# cornerstone3D in this OHIF (3.10.0-beta.5) showed 8-bit-range series (all values <= 255, as the phantom's
# 0..~150) with inverted grey levels in headless Chromium (SwiftShader WebGL), while getProperties().invert
# was false; series with larger values display correctly, so the phantom is written in 12-bit-like units.
DICOM_INTENSITY_SCALE = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (servers start workers), SIGKILL after a minute."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def _server(command: list[str], ready_url: str, log_path: str, env: dict | None = None, timeout: float = 180):
    """Run ``command`` in its own process group until ``ready_url`` answers; stop the whole group after."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + timeout
            while True:
                try:
                    requests.get(ready_url, timeout=5).raise_for_status()
                    break
                except requests.RequestException:
                    if process.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"{command[0]} did not start; see {log_path}") from None
                    time.sleep(1)
            yield
        finally:
            _stop(process)


@contextlib.contextmanager
def orthanc(work_dir: str):
    """Orthanc with the repository's config on a free port and fresh storage; yields the DICOMweb root."""
    port = _free_port()
    config_dir = os.path.join(work_dir, "orthanc_config")
    storage = os.path.join(work_dir, "orthanc_storage")
    for folder in (config_dir, storage):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
    shutil.copy(os.path.join(REPO, "apps", "orthanc", "orthanc.json"), config_dir)
    with open(os.path.join(config_dir, "port.json"), "w") as f:  # Orthanc merges the folder's files
        json.dump({"HttpPort": port}, f)
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MULTIAD_ORTHANC_STORAGE": storage}
    with _server(["Orthanc", config_dir], f"{base}/system", os.path.join(work_dir, "orthanc.log"), env):
        yield f"{base}/dicom-web"


@contextlib.contextmanager
def monailabel(env_dir: str, dicomweb: str, model: str, image_size: int, work_dir: str):
    """``monailabel start_server`` for the app of apps/monailabel on the Orthanc; yields its base URL."""
    port = _free_port()
    settings = json.dumps({"image_size": image_size}, separators=(",", ":"))  # no spaces: the launcher re-splits
    command = [
        os.path.join(env_dir, "bin", "monailabel"), "start_server", "--app", os.path.join(REPO, "apps", "monailabel"),
        "--studies", dicomweb, "--conf", "model", model, "--conf", "settings", settings,
        "--host", "127.0.0.1", "--port", str(port),
    ]
    cache = os.path.join(work_dir, "monailabel_cache")
    shutil.rmtree(cache, ignore_errors=True)
    env = {
        **os.environ, "PATH": os.path.join(env_dir, "bin") + os.pathsep + os.environ["PATH"],
        "MONAI_LABEL_DICOMWEB_CACHE_PATH": cache,
    }
    base = f"http://127.0.0.1:{port}"
    with _server(command, f"{base}/info/", os.path.join(work_dir, "monailabel.log"), env):
        yield base


class Chromium:
    """Headless Chromium driven with the DevTools protocol over ``--remote-debugging-pipe`` (JSON messages
    ended by NUL on file descriptors 3 and 4), so that nothing but the browser itself is needed."""

    def __init__(self, binary: str, profile: str):
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()
        flags = [
            "--headless=new", "--no-sandbox", f"--user-data-dir={profile}", "--remote-debugging-pipe",
            # WebGL on the CPU (SwiftShader): OHIF's cornerstone3D renders with WebGL only
            "--enable-unsafe-swiftshader", "--use-angle=swiftshader", "about:blank",
        ]
        # the shell puts the pipes on fds 3 and 4 (no preexec_fn: this process has torch's threads)
        command = ["sh", "-c", f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}', binary, *flags]
        with open(profile + ".log", "w") as log:
            self.process = subprocess.Popen(command, pass_fds=(to_browser, from_browser), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._last_id, self._session = b"", 0, None
        try:
            page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
            self._session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
            self.call("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0], height=VIEWPORT[1],
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    def call(self, method: str, **params) -> dict:
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params}
        if self._session and not method.startswith("Target."):
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:  # events arrive in between; skip them up to our answer
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium exited; see its .log beside the profile")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}...: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 90):
        deadline, error = time.time() + timeout, None
        while time.time() < deadline:
            try:
                value = self.js(expression)
            except RuntimeError as e:  # e.g. the page still loading: not there yet
                value, error = None, e
            if value:
                return value
            time.sleep(0.5)
        raise TimeoutError(f"OHIF: {what} did not happen within {timeout:.0f} s (last error: {error})")

    def click_button(self, text: str) -> bool:
        return self.js(f"""(() => {{
            const button = [...document.querySelectorAll('button')]
                .find(b => b.innerText.trim() === {json.dumps(text)});
            if (button) button.click();
            return Boolean(button); }})()""")

    def screenshot(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        _stop(self.process)
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)


def prepare_study(work_dir: str, image_size: int, num_epochs: int) -> tuple[str, list[str]]:
    """Phantom cases, a tiny model trained on them, and a held-out case as a DICOM series: (model, files)."""
    cases = make_demo_volumes(os.path.join(work_dir, "cases"), num_cases=6, shape=(96, 96, 48))
    run = os.path.join(work_dir, "run")
    model = os.path.join(run, "model.pt")
    if not os.path.isfile(model):
        tiny = ["--set", f"image_size={image_size}", "--set", f"num_epochs={num_epochs}",
                "--set", "min_epoch_length=4", "--set", "val_interval=1"]
        if multiad(["train", "--bundle_root", "multiad_medical", "--dataset_dir", cases, "--output_dir", run, *tiny]):
            raise RuntimeError("multiad train failed")
    with open(os.path.join(run, "run.json")) as f:
        held_out = json.load(f)["split"]["test"][0]  # a case the model did not train on
    image = nib.load(os.path.join(cases, held_out, "flair.nii.gz"))
    series_dir = os.path.join(work_dir, "series")
    shutil.rmtree(series_dir, ignore_errors=True)
    volume = np.asarray(image.dataobj) * DICOM_INTENSITY_SCALE
    files = write_dicom_series(volume, image.affine, series_dir, series_description=f"FLAIR phantom ({held_out})")
    return model, files


def save_anomaly_seg(base: str, dicomweb: str, study: str, series: str, work_dir: str) -> str:
    """Infer ``multiad`` on the series and save the mask as the ``final`` label, as a reader's *Submit* does:
    MONAI Label writes it into the study as a DICOM SEG. Returns the SEG's series UID."""
    # MONAI Label's image id for a DICOMweb study is the series UID
    inferred = requests.post(f"{base}/infer/multiad", params={"image": series, "output": "image"}, timeout=600)
    inferred.raise_for_status()
    with open(os.path.join(work_dir, "anomaly_label.nii.gz"), "wb") as f:  # the mask as MONAI Label returned it
        f.write(inferred.content)
    label_info = [{"name": "anomaly", "model_name": "Multi-AD anomaly", "description": "Multi-AD anomaly mask"}]
    saved = requests.put(
        f"{base}/datastore/label", params={"image": series, "tag": "final"},
        files={"label": ("label.nii.gz", inferred.content)}, data={"params": json.dumps({"label_info": label_info})},
        timeout=600,
    )
    saved.raise_for_status()
    found = requests.get(f"{dicomweb}/studies/{study}/series", headers={"Accept": "application/dicom+json"}, timeout=60)
    segs = [s["0020000E"]["Value"][0] for s in found.json() if s["00080060"]["Value"][0] == "SEG"]
    if len(segs) != 1:
        raise RuntimeError(f"expected one SEG series in the study after saving the label, found {len(segs)}")
    return segs[0]


def take_screenshot(chromium: Chromium, base: str, study: str, seg_series: str, output: str) -> None:
    chromium.call("Page.navigate", url=f"{base}/ohif/viewer?StudyInstanceUIDs={study}")
    seg_display_set = f"""window.services?.displaySetService.getActiveDisplaySets()
        .find(d => d.SeriesInstanceUID === {json.dumps(seg_series)})"""
    seg_thumbnail = f"document.getElementById('thumbnail-' + ({seg_display_set})?.displaySetInstanceUID)"
    chromium.wait_for(f"Boolean({seg_thumbnail})", "the study's series list with the SEG")
    chromium.click_button("Confirm and Hide")  # OHIF's "for investigational use only" banner
    # the segmentation panel first: opening it later resizes the viewport under the freshly drawn labelmap
    chromium.js("window.services.panelService.activatePanel("
                "'@ohif/extension-cornerstone.panelModule.panelSegmentation', true)")
    time.sleep(2)
    # the reader's step: double-click the SEG thumbnail, answer "Do you want to open this Segmentation?"
    chromium.js(f"{seg_thumbnail}.dispatchEvent(new MouseEvent('dblclick', {{bubbles: true}}))")
    chromium.wait_for("document.body.innerText.includes('Do you want to open this Segmentation?')", "the SEG prompt")
    chromium.click_button("Yes")
    chromium.wait_for("window.services.segmentationService.getSegmentations().length > 0", "loading the SEG")
    time.sleep(2)
    # the slice through the segment's centre, as OHIF's segment navigation does (without its highlight animation)
    chromium.js("""(() => {
        const { segmentationService, viewportGridService } = window.services;
        const segmentation = segmentationService.getSegmentations()[0];
        const viewportId = viewportGridService.getActiveViewportId();
        segmentationService.jumpToSegmentCenter(segmentation.segmentationId, 1, viewportId, 0.9, false);
    })()""")
    time.sleep(3)
    # one slice on and back, as a mouse wheel would: in headless Chromium the segment's outline was drawn on
    # the first slice shown in some runs only, and on every slice shown after
    chromium.js("""(async () => {
        const viewport = window.cornerstone.getEnabledElements()[0].viewport;
        const slice = viewport.getCurrentImageIdIndex();
        await viewport.setImageIdIndex(slice + 1);
        await new Promise(resolve => setTimeout(resolve, 1000));
        await viewport.setImageIdIndex(slice);
    })()""")
    time.sleep(3)  # the render
    chromium.screenshot(output)


def check_tools(args: argparse.Namespace) -> None:
    """Fail before the minutes of training when a tool is missing, saying which and where it comes from."""
    missing = [
        what for what, there in [
            (f"chromium ({args.chromium}; apt-get install chromium)", shutil.which(args.chromium)),
            ("Orthanc (apt-get install orthanc)", shutil.which("Orthanc")),
            ("Orthanc's DICOMweb plugin (apt-get install orthanc-dicomweb)", os.path.isfile(DICOMWEB_PLUGIN)),
            (f"monailabel in {args.monailabel_env} (.ci/run builds it)",
             os.path.isfile(os.path.join(args.monailabel_env, "bin", "monailabel"))),
            (f"dcmqi in {args.monailabel_env} (pip install dcmqi there)",
             os.path.isfile(os.path.join(args.monailabel_env, "bin", "itkimage2segimage"))),
        ] if not there
    ]
    if missing:
        raise SystemExit("missing: " + "; ".join(missing))


def run(args: argparse.Namespace) -> None:
    check_tools(args)
    work_dir = os.path.abspath(args.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    model, files = prepare_study(work_dir, args.image_size, args.num_epochs)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series = str(source.StudyInstanceUID), str(source.SeriesInstanceUID)
    profile = os.path.join(work_dir, "chromium_profile")
    shutil.rmtree(profile, ignore_errors=True)

    with contextlib.ExitStack() as stack:
        dicomweb = stack.enter_context(orthanc(work_dir))
        store_dicomweb_instances(dicomweb, files)
        base = stack.enter_context(monailabel(args.monailabel_env, dicomweb, model, args.image_size, work_dir))
        seg_series = save_anomaly_seg(base, dicomweb, study, series, work_dir)
        chromium = Chromium(args.chromium, profile)
        stack.callback(chromium.close)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        take_screenshot(chromium, base, study, seg_series, args.output)
    print(f"screenshot: {args.output} (study {study}, SEG series {seg_series}; logs in {work_dir})")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", default="/tmp/multiad_ohif", help="phantom, model, server storage and logs")
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "images", "ohif_anomaly_seg.png"))
    parser.add_argument("--monailabel_env", default=os.environ.get("MULTIAD_MONAILABEL_ENV",
                                                                   os.path.join(REPO, ".monailabel-env")))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--image_size", type=int, default=128, help="slice size of the tiny model")
    parser.add_argument("--num_epochs", type=int, default=3, help="training epochs of the tiny model")
    return parser.parse_args()


if __name__ == "__main__":
    run(parse_args())
