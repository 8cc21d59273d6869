"""The image endpoint, called over real HTTP: the FastAPI application on a uvicorn server in this
process (status codes, metrics, images equal to the eager pipeline's), and ``tgate-kernels serve``
on Ray Serve with the shipped micro pipeline, started as a user starts it."""

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
import torch
from PIL import Image

import tgate_kernels
from tgate_kernels.serving import StepBatcher
from tgate_kernels.serving.http_api import create_app
from fixtures.tiny_pipelines import tiny_sd

SIZE = 32


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"), dtype=np.int16)


def _samples(text: str) -> dict[str, float]:
    """The samples of a Prometheus text exposition, by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""): value
        for family in text_string_to_metric_families(text) for name, labels, value, *_ in family.samples
    }


def _eager(pipe, prompt, seed, steps, guidance, gate, **call) -> np.ndarray:
    """The ordinary pipeline's image, T-GATE enabled at ``gate`` (``None``: plain)."""
    if gate is not None:
        tgate_kernels.enable(pipe, gate_step=gate)
    try:
        with torch.no_grad():
            image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                         generator=torch.Generator().manual_seed(seed), **call).images[0]
    finally:
        tgate_kernels.disable(pipe)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture
def server(request):
    """A uvicorn server of the endpoint over a step batcher of the tiny pipeline (options from
    the test's ``batcher`` marker)."""
    import uvicorn

    marker = request.node.get_closest_marker("batcher")
    options = marker.kwargs if marker else {}
    batcher = StepBatcher(tiny_sd(), height=SIZE, width=SIZE, **options)
    app = create_app(batcher, default_steps=6, default_gate=3, default_guidance=5.0)
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            requests.get(f"{url}/health", timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.05)
    yield url
    running.should_exit = True
    thread.join(timeout=10)
    batcher.close()


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_images_come_back_as_the_eager_pipeline_makes_them(server):
    body = {"prompt": "a red square", "n": 2, "seed": 5, "size": f"{SIZE}x{SIZE}", "response_format": "b64_json"}
    answer = requests.post(f"{server}/v1/images/generations", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert len(data) == 2
    pipe = tiny_sd()
    for index, item in enumerate(data):
        expected = _eager(pipe, "a red square", 5 + index, 6, 5.0, 3, height=SIZE, width=SIZE)
        assert np.abs(_pixels(item) - expected).max() <= 1, "PNG of the same image, up to rounding"
    # the extensions: another gate, no T-GATE, other steps
    for extra in ({"gate_step": 1}, {"gate_step": None, "num_inference_steps": 4}):
        answer = requests.post(f"{server}/v1/images/generations", json={"prompt": "two blue circles", "seed": 1, **extra}, timeout=120)
        assert answer.status_code == 200, answer.text
        expected = _eager(pipe, "two blue circles", 1, extra.get("num_inference_steps", 6), 5.0, extra["gate_step"],
                          height=SIZE, width=SIZE)
        assert np.abs(_pixels(answer.json()["data"][0]) - expected).max() <= 1
    health = requests.get(f"{server}/health", timeout=5).json()
    assert health == {"status": "ok", "running": 0, "waiting": 0, "rows": 0}
    metrics = _samples(requests.get(f"{server}/metrics", timeout=5).text)
    assert metrics["tgate_requests_total"] == 3 and metrics["tgate_images_total"] == 4
    assert metrics['tgate_load{what="running"}'] == 0 and metrics["tgate_generation_seconds_total"] > 0


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompt": "x", "n": 0}, "`n` must be an integer from 1 to 8, got 0"),
        ({"prompt": "x", "size": "64x64"}, "`size` must be 32x32 on this server, got '64x64'"),
        ({"prompt": "x", "response_format": "url"}, "`response_format` must be b64_json"),
        ({"prompt": ""}, "`prompt` must be a non-empty string"),
        ({"prompt": "x", "num_inference_steps": 4, "gate_step": 9}, "gate_step"),
        ({"prompt": "x", "steps": 4}, "unknown fields ['steps']"),
        ({"prompt": "x", "seed": -1}, "`seed` must be a non-negative integer, got -1"),
    ],
)
def test_bad_requests_get_400_saying_what_is_wrong(server, body, message):
    answer = requests.post(f"{server}/v1/images/generations", json=body, timeout=30)
    assert answer.status_code == 400
    assert message in answer.json()["error"]["message"]


@pytest.mark.batcher(max_queued=0, start=False)
def test_a_full_replica_answers_429(server):
    answer = requests.post(f"{server}/v1/images/generations", json={"prompt": "a red square"}, timeout=30)
    assert answer.status_code == 429
    assert "busy" in answer.json()["error"]["message"]
    assert _samples(requests.get(f"{server}/metrics", timeout=5).text)['tgate_refused_total{reason="overloaded"}'] == 1


def test_tgate_kernels_serve_on_ray_answers_over_http():
    """The command a user runs: Ray Serve with the shipped micro pipeline on localhost."""
    from tgate_kernels.tools.micro.adherence import load_micro_pipeline

    port = _free_port()
    environment = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    command = [sys.executable, "-m", "tgate_kernels", "serve", "--model", "micro-sd", "--port", str(port), "--max-rows", "8"]
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read()
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or Serve's proxy still starting
                pass
            time.sleep(1)
        else:
            pytest.fail("the server did not answer /health within 10 minutes")
        body = {"prompt": "a small red circle on the left", "n": 2, "seed": 11}
        answer = requests.post(f"{url}/v1/images/generations", json=body, timeout=300)
        assert answer.status_code == 200, answer.text
        bad = requests.post(f"{url}/v1/images/generations", json={"prompt": "x", "n": 99}, timeout=30)
        assert bad.status_code == 400 and "`n`" in bad.json()["error"]["message"]
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)
    pipe = load_micro_pipeline("sd")
    for index, item in enumerate(answer.json()["data"]):
        expected = _eager(pipe, body["prompt"], 11 + index, 20, 4.0, 0.4, height=32, width=32)
        assert np.abs(_pixels(item) - expected).max() <= 1


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--max-rows", "1"], "--max-rows: must be at least 2"),
        (["--gate-step", "auto"], "auto is not allowed here"),
        (["--port", "0"], "--port"),
    ],
)
def test_serve_refuses_bad_options_before_starting_anything(arguments, message, capsys):
    from tgate_kernels.tools import cli

    with pytest.raises(SystemExit) as raised:
        cli.main(["serve", "--model", "micro-sd", *arguments])
    assert raised.value.code == 2 and message in capsys.readouterr().err
