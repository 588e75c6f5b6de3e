"""A1111's Python client (webuiapi) against the server, through the client's public API only.

Run by scripts/client-tests.sh (SERVER_URL, API_KEY; the tiny model with --open-ranges). Each generation is compared
with the image of the same request on the hosted v1 endpoint (same seed, scheduler, steps, size).

How images are compared: the A1111 endpoint answers PNG (lossless), the v1 endpoint JPEG (quality 90). The PNG's
pixels are the generated pixels; the v1 JPEG is those pixels after JPEG's loss, which on the tiny model's noisy images
is ~13/255 per pixel: too much for a per-pixel check to tell two such images apart. What JPEG does keep is each
block's mean (its DC coefficient, finely quantised at quality 90), so the check compares 16×16 block means within
2/255, and a negative control (another seed's image) shows that this tolerance tells images apart. (tests/
server_a1111.rs makes the exact check: our PNG's pixels through the server's own JPEG encoder give v1's bytes.)
"""

import base64
import io
import json
import os
import sys
import threading
import time
import urllib.parse
import urllib.request

import webuiapi
from PIL import Image

SERVER_URL = os.environ["SERVER_URL"]
API_KEY = os.environ["API_KEY"]
# Image comparison (see assert_same_image): 16×16 block means, within 2/255 (clipping at 0 and 255 moves a noisy block's mean by a level or so).
BLOCK = 16
BLOCK_TOLERANCE = 2.0


def client():
    url = urllib.parse.urlparse(SERVER_URL)
    api = webuiapi.WebUIApi(host=url.hostname, port=url.port)
    api.set_auth("user", API_KEY)
    return api


def v1(path, body):
    """The hosted v1 endpoint's JPEGs for `body` (JSON form), as RGB images."""
    request = urllib.request.Request(
        SERVER_URL + path,
        data=json.dumps({**body, "base64": True}).encode(),
        headers={"content-type": "application/json", "x-api-key": API_KEY},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
    encoded = answer.get("images") or [answer["image"]]
    return [Image.open(io.BytesIO(base64.b64decode(e))).convert("RGB") for e in encoded]


def mean_abs_diff(a, b):
    assert a.size == b.size, (a.size, b.size)
    pa, pb = a.tobytes(), b.tobytes()
    return sum(abs(x - y) for x, y in zip(pa, pb)) / len(pa)


def block_means(image, side=BLOCK):
    """The mean of each channel over each side × side block."""
    w, h = image.size
    pixels = image.load()
    means = []
    for by in range(0, h - h % side, side):
        for bx in range(0, w - w % side, side):
            for c in range(3):
                total = sum(pixels[x, y][c] for y in range(by, by + side) for x in range(bx, bx + side))
                means.append(total / (side * side))
    return means


def assert_same_image(png, jpeg, what, other=None):
    """JPEG keeps each block's mean: the DC coefficient of each 8×8 luma block and, with 4:2:0 subsampling, of each
    16×16 chroma block, quantised at quality 90 to a fraction of a level. So the 16×16 block means of v1's JPEG equal
    those of our PNG within rounding, however noisy the texture (the tiny model's images are mostly noise, which JPEG
    loses ~13/255 of per pixel); another image's differ by whole levels."""
    png = png.convert("RGB")
    ours, theirs = block_means(png), block_means(jpeg)
    diff = max(abs(a - b) for a, b in zip(ours, theirs))
    assert diff <= BLOCK_TOLERANCE, f"{what}: a 16×16 block mean of v1's JPEG is {diff:.2f}/255 from the PNG's"
    line = f"  {what}: block means within {diff:.2f}/255 of v1's JPEG (pixels {mean_abs_diff(png, jpeg):.2f}/255)"
    if other is not None:
        far = max(abs(a - b) for a, b in zip(ours, block_means(other.convert("RGB"))))
        assert far > 4 * BLOCK_TOLERANCE, f"{what}: another seed's block means are only {far:.2f}/255 away"
        line += f"; another seed's: {far:.2f}/255"
    print(line)


def png_parameters(image):
    return image.info.get("parameters", "")


def check_txt2img(api):
    result = api.txt2img(
        prompt="a photo of a Grumpy cat",
        negative_prompt="blurry",
        seed=1234,
        sampler_name="DPM++ 2M",
        scheduler="Karras",
        steps=2,
        cfg_scale=6,
        width=64,
        height=64,
        batch_size=2,
    )
    assert len(result.images) == 2, result.images
    info = result.info
    assert info["seed"] == 1234 and info["all_seeds"] == [1234, 1234], info
    assert info["sampler_name"] == "DPM++ 2M", info
    assert result.parameters["steps"] == 2, result.parameters
    reference = v1(
        "/v1/sdxl1.0-dreamshaper",
        {
            "prompt": "a photo of a Grumpy cat",
            "negative_prompt": "blurry",
            "seed": 1234,
            "scheduler": "DPM++ 2M Karras",
            "num_inference_steps": 2,
            "guidance_scale": 6,
            "img_width": 64,
            "img_height": 64,
            "samples": 2,
        },
    )
    other = api.txt2img(prompt="a photo of a Grumpy cat", negative_prompt="blurry", seed=99, sampler_name="DPM++ 2M",
                        scheduler="Karras", steps=2, cfg_scale=6, width=64, height=64).image
    for i, (image, jpeg) in enumerate(zip(result.images, reference)):
        text = png_parameters(image)
        assert text == info["infotexts"][i], (text, info["infotexts"][i])
        assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6, Seed: 1234, Size: 64x64" in text, text
        assert_same_image(image, jpeg, f"txt2img image {i}", other if i == 0 else None)


def check_img2img(api):
    source = Image.new("RGB", (64, 64))
    source.putdata([((x * 4) % 256, (y * 4) % 256, 128) for y in range(64) for x in range(64)])
    result = api.img2img(
        images=[source],
        prompt="a cat",
        seed=9,
        sampler_name="Euler a",
        steps=4,
        cfg_scale=5,
        denoising_strength=0.5,
        width=64,
        height=64,
    )
    assert len(result.images) == 1
    assert result.image.size == (64, 64)
    assert "Denoising strength: 0.5" in png_parameters(result.image), png_parameters(result.image)
    out = io.BytesIO()
    source.save(out, format="PNG")
    reference = v1(
        "/v1/sdxl-img2img",
        {
            "prompt": "a cat",
            "image": base64.b64encode(out.getvalue()).decode(),
            "strength": 0.5,
            "seed": 9,
            "scheduler": "Euler a",
            "num_inference_steps": 4,
            "guidance_scale": 5,
        },
    )
    assert_same_image(result.image, reference[0], "img2img")


def check_progress_and_interrupt(api):
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0, idle
    answer = {}

    def run():
        try:
            answer["result"] = client().txt2img(prompt="a long one", seed=5, sampler_name="Euler", steps=100,
                                                width=256, height=256)
        except Exception as e:  # reported below
            answer["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 120
    seen = None
    while time.time() < deadline:
        progress = api.get_progress()
        if progress["state"]["sampling_step"] >= 1 and progress.get("current_image"):
            seen = progress
            break
        time.sleep(0.05)
    assert seen is not None, f"no progress with a preview within 120 s: {progress}"
    assert 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 100, seen
    preview = Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))
    assert preview.size[0] > 0, preview.size
    print(f"  progress: {seen['progress']:.2f}, eta {seen['eta_relative']:.1f} s, preview {preview.size}")
    api.interrupt()
    thread.join(120)
    assert not thread.is_alive(), "the interrupted request did not finish"
    assert "error" not in answer, answer.get("error")
    result = answer["result"]
    assert result.images == [] and result.info["interrupted"] is True, result.info
    assert api.get_progress()["state"]["job_count"] == 0


def check_lists(api):
    names = [s["name"] for s in api.get_samplers()]
    assert "DPM++ 2M" in names and "Euler a" in names, names
    labels = [s["label"] for s in api.get_schedulers()]
    assert "Karras" in labels and "Automatic" in labels, labels
    assert api.get_sd_models()[0]["model_name"], api.get_sd_models()
    options = api.get_options()
    assert options["samples_format"] == "png", options
    api.set_options({"CLIP_stop_at_last_layers": 1})
    assert isinstance(api.get_loras(), list)


def check_errors(api):
    try:
        api.txt2img(prompt="x", sampler_name="No such sampler", steps=1, width=64, height=64)
    except RuntimeError as e:
        status, text = e.args
        assert status == 422 and "unknown sampler" in text, e.args
    else:
        raise AssertionError("an unknown sampler was accepted")
    unauthenticated = webuiapi.WebUIApi(host=urllib.parse.urlparse(SERVER_URL).hostname,
                                        port=urllib.parse.urlparse(SERVER_URL).port, username="user", password="wrong")
    try:
        unauthenticated.txt2img(prompt="x", steps=1, width=64, height=64)
    except RuntimeError as e:
        assert e.args[0] == 401, e.args
    else:
        raise AssertionError("a wrong key was accepted")


def main():
    api = client()
    for check in [check_lists, check_txt2img, check_img2img, check_progress_and_interrupt, check_errors]:
        print(check.__name__)
        check(api)
    print("webuiapi: ok")


if __name__ == "__main__":
    sys.exit(main())
