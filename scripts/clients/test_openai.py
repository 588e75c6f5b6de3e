"""The server driven by OpenAI's own Python client (`openai`, from PyPI), through its public API only:
`client.images.generate(...)`, its raw-response wrapper and its exception classes.

Run by scripts/client-tests.sh, which starts the server (tiny model, --open-ranges, key in API_KEY) and passes
SERVER_URL and API_KEY. Each image is compared with the hosted v1 endpoint's for the same request (same seed,
scheduler, steps, guidance, size, negative prompt; OpenAI has none of these, so they go in the client's
`extra_body`, which the server takes as extensions):

- The default answer is a PNG (as OpenAI's); v1 answers a JPEG (quality 90). The PNG's pixels are the generation's
  exactly, so decoded they must be within JPEG error of v1's decoded JPEG: a mean absolute difference under
  JPEG_TOLERANCE levels (of 255), and well under the difference to an image of another seed, so the check cannot pass
  by accident.
- With `output_format="jpeg", output_compression=90` the server encodes with v1's own encoder at v1's quality, so
  the bytes must be identical to v1's: the exact check.
"""

import base64
import io
import os
import sys

import openai
import requests
from PIL import Image

SERVER_URL = os.environ["SERVER_URL"]
API_KEY = os.environ["API_KEY"]
V1 = f"{SERVER_URL}/v1/sdxl1.0-dreamshaper"

# Mean absolute difference (0-255 levels) allowed between a PNG's pixels and the same pixels through JPEG quality 90;
# the tiny model's 64x64 images are mostly high-frequency noise, JPEG's worst case: ~5 here, against ~50 for
# another seed.
JPEG_TOLERANCE = 8.0

client = openai.OpenAI(api_key=API_KEY, base_url=f"{SERVER_URL}/v1", max_retries=0, timeout=300)

EXTRA = {"seed": 4242, "scheduler": "Euler a", "num_inference_steps": 3, "guidance_scale": 6.5,
         "negative_prompt": "fog"}
PROMPT = "a lighthouse at dusk"


def v1_images(prompt, samples, width, height, extra):
    """The hosted endpoint's images (JPEG bytes) for the same request."""
    body = {"prompt": prompt, "samples": samples, "img_width": width, "img_height": height, "base64": True, **extra}
    r = requests.post(V1, json=body, headers={"x-api-key": API_KEY}, timeout=300)
    r.raise_for_status()
    answer = r.json()
    return [base64.b64decode(image) for image in answer.get("images", [answer["image"]])]


def pixels(data):
    return Image.open(io.BytesIO(data)).convert("RGB")


def mean_abs_diff(a, b):
    assert a.size == b.size, (a.size, b.size)
    pa, pb = a.tobytes(), b.tobytes()
    return sum(abs(x - y) for x, y in zip(pa, pb)) / len(pa)


def check(condition, what):
    if not condition:
        raise AssertionError(what)
    print(f"  ok: {what}")


def test_png_images_equal_v1s():
    result = client.images.generate(prompt=PROMPT, n=2, size="64x72", response_format="b64_json",
                                    model="gpt-image-1", quality="high", extra_body=EXTRA)
    check(len(result.data) == 2 and result.created > 0, "two images and a creation time")
    check(all(d.revised_prompt == PROMPT for d in result.data), "revised_prompt is the prompt as used")
    pngs = [base64.b64decode(d.b64_json) for d in result.data]
    check(all(p.startswith(b"\x89PNG") for p in pngs), "b64_json holds PNGs")
    images = [Image.open(io.BytesIO(p)) for p in pngs]
    check(all(i.size == (64, 72) for i in images), "of the size asked")
    check("Seed: 4242" in images[0].info.get("parameters", ""), "with A1111's parameters chunk")
    reference = [pixels(j) for j in v1_images(PROMPT, 2, 64, 72, EXTRA)]
    other_seed = pixels(v1_images(PROMPT, 1, 64, 72, {**EXTRA, "seed": 4243})[0])
    for i, (image, v1) in enumerate(zip(images, reference)):
        same = mean_abs_diff(image.convert("RGB"), v1)
        other = mean_abs_diff(image.convert("RGB"), other_seed)
        print(f"  image {i}: mean |PNG - v1 JPEG| = {same:.2f}, against another seed {other:.2f}")
        check(same < JPEG_TOLERANCE and same * 3 < other, f"image {i} equals v1's within JPEG error")


def test_jpeg_bytes_equal_v1s():
    extra = {**EXTRA, "seed": 77}
    result = client.images.generate(prompt=PROMPT, size="64x64", output_format="jpeg", output_compression=90,
                                    extra_body=extra)
    check(result.output_format == "jpeg", "output_format jpeg is answered as such")
    jpeg = base64.b64decode(result.data[0].b64_json)
    check(jpeg == v1_images(PROMPT, 1, 64, 64, extra)[0], "JPEG quality 90: byte for byte v1's JPEG")


def test_random_seed_is_reported_and_reproduces():
    request = {"prompt": "a castle", "size": "64x64"}
    extra = {"scheduler": "Euler", "num_inference_steps": 2}
    raw = client.images.with_raw_response.generate(**request, extra_body=extra)
    seed = int(raw.headers["x-seed-value"])
    first = raw.parse()
    again = client.images.generate(**request, extra_body={**extra, "seed": seed})
    check(again.data[0].b64_json == first.data[0].b64_json, f"the reported seed {seed} reproduces the image")


def expect(error_class, what, **kwargs):
    try:
        client.images.generate(**kwargs)
    except error_class as e:
        print(f"  {error_class.__name__}: {e.message!r} (param {e.param!r}, code {e.code!r}, type {e.type!r})")
        return e
    raise AssertionError(f"{what}: no {error_class.__name__}")


def test_errors_through_the_client():
    e = expect(openai.BadRequestError, "n=9", prompt="x", n=9, size="64x64")
    check(e.status_code == 400 and e.param == "n" and "between 1 and 4" in str(e.body["message"]),
          "n=9: BadRequestError naming n")
    e = expect(openai.BadRequestError, "url", prompt="x", size="64x64", response_format="url")
    check(e.param == "response_format" and "b64_json" in e.body["message"], "response_format url: refused, saying why")
    e = expect(openai.BadRequestError, "size", prompt="x", size="64x60")
    check(e.param == "size", "a size off the multiple of 8: BadRequestError naming size")
    e = expect(openai.BadRequestError, "scheduler", prompt="x", size="64x64", extra_body={"scheduler": "nope"})
    check(e.param == "scheduler" and "Euler" in e.body["message"], "unknown scheduler: listed alternatives")
    wrong = openai.OpenAI(api_key="not-the-key", base_url=f"{SERVER_URL}/v1", max_retries=0)
    try:
        wrong.images.generate(prompt="x", size="64x64")
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        check(e.status_code == 401 and e.code == "invalid_api_key", "a wrong key: AuthenticationError")


def main():
    tests = [test_png_images_equal_v1s, test_jpeg_bytes_equal_v1s, test_random_seed_is_reported_and_reproduces,
             test_errors_through_the_client]
    failed = 0
    for test in tests:
        print(f"{test.__name__} (openai {openai.__version__})")
        try:
            test()
        except Exception as e:  # report every test, then fail
            failed += 1
            print(f"  FAILED: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
