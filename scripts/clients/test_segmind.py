"""The hosted service's official Python SDK (`segmind` 1.3.0) against the local server, through its public API only:
`run_sync` (v1), `run` (v2: submit, poll, result), `submit_async` with `AsyncJob.status/wait/result`, and its errors
(`SegmindError`, `InferenceFailed`). Every image must decode and equal the v1 endpoint's image for the same request
(same seed, scheduler, steps).

The SDK has no cancel call (cancellation is covered by tests/server_v2.rs). The v2 result's `output` is a URL of the
server's, fetched here with the same key, as a user of the hosted API fetches its output URL.

Run by scripts/client-tests.sh, which passes SERVER_URL and API_KEY.
"""

import base64
import io
import os
import sys

import requests
import segmind
from PIL import Image
from segmind import SegmindClient
from segmind.exceptions import SegmindError
from segmind.v2 import InferenceFailed

SERVER_URL = os.environ["SERVER_URL"].rstrip("/")
API_KEY = os.environ["API_KEY"]
TXT2IMG = "sdxl1.0-dreamshaper"
IMG2IMG = "sdxl-img2img"

assert segmind.__version__ == "1.3.0", segmind.__version__

# The two lines the README gives: the SDK pointed at the local server.
client = SegmindClient(api_key=API_KEY, base_url=f"{SERVER_URL}/v1")


def params(**overrides):
    p = dict(
        prompt="a lighthouse on a cliff",
        negative_prompt="blurry",
        scheduler="Euler",
        num_inference_steps=2,
        guidance_scale=7.5,
        seed=1234,
        img_width=64,
        img_height=64,
        samples=1,
        base64=False,
    )
    p.update(overrides)
    return p


def pixels(jpeg: bytes):
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG", image.format
    image.load()
    return image.convert("RGB")


def same_image(got: bytes, expected: bytes, what: str):
    a, b = pixels(got), pixels(expected)
    assert a.size == b.size, f"{what}: size {a.size} != {b.size}"
    assert a.tobytes() == b.tobytes(), f"{what}: pixels differ from v1's"
    # The encoder is deterministic: the same image is the same JPEG.
    assert got == expected, f"{what}: JPEG bytes differ from v1's"
    print(f"  {what}: {a.size[0]}x{a.size[1]}, identical to v1's")


def fetch(url: str) -> bytes:
    assert url.startswith(SERVER_URL + "/v2/requests/"), url
    r = requests.get(url, headers={"x-api-key": API_KEY}, timeout=30)
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.headers["content-type"] == "image/jpeg", r.headers
    return r.content


def outputs(result: dict):
    assert result["status"] == "COMPLETED", result
    assert result["error"] is None, result
    assert result["metrics"]["inference_time"] > 0, result
    output = result["output"]
    return output if isinstance(output, list) else [output]


def main():
    # v1 through run_sync: the reference image.
    response = client.run_sync(TXT2IMG, **params())
    assert response.headers["content-type"] == "image/jpeg", response.headers
    assert response.headers["x-seed-value"] == "1234"
    v1 = response.content
    pixels(v1)
    print("run_sync (v1): ok")

    # run: v2 submit, poll every second, result; the output URL serves v1's image.
    result = client.run(TXT2IMG, **params())
    assert result["seed"] == 1234, result
    [url] = outputs(result)
    same_image(fetch(url), v1, "run (v2)")

    # submit_async: the handle's URLs are absolute, status and result as the SDK reads them.
    job = client.submit_async(TXT2IMG, **params())
    assert job.request_id and job.status_url.startswith(SERVER_URL), job
    assert job.response_url.startswith(SERVER_URL), job
    assert job.submit_response["status"] == "QUEUED", job.submit_response
    first = job.status()
    assert first["status"] in ("QUEUED", "PROCESSING", "COMPLETED"), first
    assert "progress" in first and "total" in first["progress"], first
    done = job.wait(timeout=60, interval=0.1)
    same_image(fetch(outputs(done)[0]), v1, "submit_async + wait")
    final = job.status()
    assert final["status"] == "COMPLETED", final
    assert final["progress"]["step"] == final["progress"]["total"] == 2, final
    assert job.result() == done
    print("submit_async: status, wait, result: ok")

    # Several samples: a list of URLs, each v1's image.
    v1_json = client.run_sync(TXT2IMG, **params(samples=2, base64=True)).json()
    expected = [base64.b64decode(b) for b in v1_json["images"]]
    urls = outputs(client.run(TXT2IMG, **params(samples=2)))
    assert len(urls) == 2, urls
    for n, (url, want) in enumerate(zip(urls, expected)):
        same_image(fetch(url), want, f"run (v2), sample {n}")

    # Python's None for optional fields reads as absent, on v1 and v2.
    none_params = params(negative_prompt=None, samples=None, guidance_scale=None)
    none_v1 = client.run_sync(TXT2IMG, **none_params).content
    default_v1 = client.run_sync(TXT2IMG, **params(negative_prompt="", samples=1, guidance_scale=7.5)).content
    same_image(none_v1, default_v1, "None fields (v1)")
    same_image(fetch(outputs(client.run(TXT2IMG, **none_params))[0]), default_v1, "None fields (v2)")

    # Image to image on both: the v1 text-to-image output as input.
    image = base64.b64encode(v1).decode()
    img2img = params(image=image, strength=0.5, num_inference_steps=4)
    v1_img2img = client.run_sync(IMG2IMG, **img2img).content
    same_image(fetch(outputs(client.run(IMG2IMG, **img2img))[0]), v1_img2img, "img2img run (v2)")

    # Errors before queueing: SegmindError with v1's status and message.
    try:
        client.submit_async(TXT2IMG, **params(samples=9))
        raise AssertionError("samples=9 was accepted")
    except SegmindError as e:
        assert e.status == 400 and "samples" in (e.detail or ""), (e.status, e.detail)
    try:
        SegmindClient(api_key="wrong", base_url=f"{SERVER_URL}/v1").run(TXT2IMG, **params())
        raise AssertionError("a wrong key was accepted")
    except SegmindError as e:
        assert e.status == 401, (e.status, e.detail)
    try:
        client.run("no-such-model", prompt="x")
        raise AssertionError("an unknown slug was accepted")
    except SegmindError as e:
        assert e.status == 404 and e.detail == "Model not found", (e.status, e.detail)
    print("errors before queueing: ok")

    # A job that fails in the worker: InferenceFailed with the server's message.
    try:
        client.run(TXT2IMG, **params(loras=[{"name": "no-such-lora"}]))
        raise AssertionError("a missing LoRA was accepted")
    except InferenceFailed as e:
        assert e.status_body["status"] == "FAILED" and "lora" in (e.detail or "").lower(), (e.detail, e.status_body)
        print(f"InferenceFailed: {e.detail}")
    except SegmindError as e:
        # A server that refuses the LoRA before queueing answers 400 instead.
        assert e.status == 400 and "lora" in (e.detail or "").lower(), (e.status, e.detail)
        print(f"refused before queueing: {e.detail}")

    print("segmind: all ok")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        raise
