"""`cnn-jax explore` (issue 14 part 5): the interactive page for a trained model.

A LeNet-5 of `lenet5_digits` is trained here for a few seconds with the project's train step on
scikit-learn's digits (the CLI's training costs half a minute of this machine), served in a
thread, and driven three ways: HTTP requests (answers equal `predict.layer_activations`; bad
requests get a 4xx with a message and the server goes on), a real headless Chromium through
Selenium and Debian's chromedriver (draw, watch the prediction and maps change, hover a unit,
drop files), and the command line in a subprocess on a workdir written with the project's
checkpoint store.
"""

from __future__ import annotations

import base64
import http.client
import io
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image, ImageDraw

from cnn_jax import cli, predict
from cnn_jax import config as config_lib
from cnn_jax.explore import Explorer, ExplorerServer
from cnn_jax.explore import server as server_lib

REPO = Path(__file__).resolve().parent.parent
STATIC = REPO / "cnn_jax" / "explore" / "static"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PAD = 280  # the page's drawing pad, pixels


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, with how to fix it; None when they can."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        return (f"{' and '.join(missing)} not found: the explorer's browser tests need Debian's "
                "Chromium: apt-get install -y chromium chromium-driver")  # fmt: skip
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[dev]' (or pip install selenium)"
    return None


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))


# ----------------------------------------------------------------------------------------------
# A trained digits model, its explorer and a server in a thread
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    """(config, model, TrainState): lenet5_digits trained for 100 steps of 64 digits (about 4.5
    epochs of 4 in 5 digits, no augmentation) by `make_train_step`: 97% of the others right."""
    from cnn_jax.data.digits import digits_arrays
    from cnn_jax.train.restore import build_model
    from cnn_jax.train.state import create_train_state
    from cnn_jax.train.steps import make_train_step

    config = config_lib.load_config("lenet5_digits")
    model = build_model(config, 10)
    images, labels = digits_arrays()
    x = predict.preprocess_for_model(config, images)
    tx = optax.adam(3e-3)
    state = create_train_state(model, tx, (32, 32, 1), jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(model, tx))
    train = np.flatnonzero(np.arange(len(labels)) % 5)
    order = np.random.default_rng(0).permutation(np.tile(train, 5))
    for i in range(100):
        idx = order[i * 64 : (i + 1) * 64]
        state, _ = step(state, {"image": x[idx], "label": jnp.asarray(labels[idx], jnp.int32)})
    return config, model, state


@pytest.fixture(scope="module")
def explorer(trained):
    config, model, state = trained
    return Explorer(model, state.variables(), config, name="lenet5 (test)")


@pytest.fixture(scope="module")
def server(explorer):
    srv = ExplorerServer(explorer, 0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def request(server, method, path, body=None, headers=None):
    """(status, parsed JSON or text) of one request to `server`."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        data = reply.read()
    finally:
        conn.close()
    kind = reply.getheader("Content-Type", "")
    return reply.status, json.loads(data) if kind.startswith("application/json") else data


def raw_request(server, data: bytes) -> tuple[int, dict]:
    """Sends `data` as it is on a socket; (status, JSON body) of the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def drawing(shape: str, width: int = 40, light: bool = False) -> bytes:
    """A PNG of the pad with a '1', '7' or '0' drawn on it (white on black; `light`: the other
    way round, as on paper), with the page's brush for 8x8 digits (40 pixels)."""
    ink, paper = (0, 255) if light else (255, 0)
    im = Image.new("L", (PAD, PAD), paper)
    d = ImageDraw.Draw(im)
    if shape == "1":
        d.line([(140, 30), (140, 250)], fill=ink, width=width)
    elif shape == "7":
        d.line([(60, 40), (220, 40), (120, 250)], fill=ink, width=width, joint="curve")
    elif shape == "0":
        d.ellipse([50, 20, 230, 260], outline=ink, width=width - 10)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def f32(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), "<f4")


# ----------------------------------------------------------------------------------------------
# The model side: layers, geometry, answers
# ----------------------------------------------------------------------------------------------


def test_layers_and_geometry(explorer):
    """LeNet-5 on 32x32: every conv and pooling layer with its window, its source and its
    receptive field (5, 6, 14, 16 pixels wide, jumps 1, 2, 2, 4)."""
    got = [
        (l.name, l.kind, l.shape, l.source, l.window, l.stride, l.pad, l.rf_size, l.rf_jump)
        for l in explorer.layers
    ]
    assert got == [
        ("block1/conv1", "conv", (28, 28, 6), -1, (5, 5), (1, 1), (0, 0), (5, 5), (1, 1)),
        ("block1/pool", "pool", (14, 14, 6), 0, (2, 2), (2, 2), (0, 0), (6, 6), (2, 2)),
        ("block2/conv1", "conv", (10, 10, 16), 1, (5, 5), (1, 1), (0, 0), (14, 14), (2, 2)),
        ("block2/pool", "pool", (5, 5, 16), 2, (2, 2), (2, 2), (0, 0), (16, 16), (4, 4)),
        ("head/hidden1", "dense", (120,), None, None, None, None, None, None),
        ("head/hidden2", "dense", (84,), None, None, None, None, None, None),
        ("head/logits", "dense", (10,), None, None, None, None, None, None),
    ]
    assert {l.rf_start for l in explorer.layers[:4]} == {(0, 0)}  # no padding anywhere
    assert explorer.native_shape == (8, 8, 1) and explorer.input_shape == (32, 32, 1)
    assert explorer.background == "dark"


def describe(net, shape) -> list:
    """`net`'s layers as the explorer describes them, from shapes only (nothing computed)."""
    from cnn_jax.explore.network import _describe, traced_layers

    layers = []

    def run(x):
        _, records = traced_layers(net, net.init(jax.random.PRNGKey(0), x), x)
        layers.extend(_describe(records, x, 32))
        return x

    jax.eval_shape(run, jnp.zeros(shape))
    return layers


def test_geometry_of_padded_strided_layers():
    """SAME padding and strides: the pad before each window is XLA's (pad 2 for a 5x5 conv,
    1 for a 3x3 stride-2 pool of 15 rows), and the receptive field starts in the padding."""
    import flax.linen as nn

    from cnn_jax.layers import Conv, Pool

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.relu(Conv(4, (5, 5), padding="SAME", name="c1")(x))
            x = Pool("max", 3, 2, padding="SAME", name="p1")(x)  # 15 -> 8
            x = Conv(4, (3, 3), strides=2, padding=1, name="c2")(x)
            return nn.Dense(3, name="out")(x.reshape(x.shape[0], -1))

    got = [(l.name, l.source, l.pad, l.stride, l.shape, l.rf_start, l.rf_jump, l.rf_size)
           for l in describe(Net(), (1, 15, 15, 1))]  # fmt: skip
    assert got == [
        ("c1", -1, (2, 2), (1, 1), (15, 15, 4), (-2, -2), (1, 1), (5, 5)),
        ("p1", 0, (1, 1), (2, 2), (8, 8, 4), (-3, -3), (2, 2), (7, 7)),
        ("c2", 1, (1, 1), (2, 2), (4, 4, 4), (-5, -5), (4, 4), (11, 11)),
        ("out", None, None, None, (3,), None, None, None),
    ]


def test_receptive_field_is_the_union_over_a_residual_block():
    """After `c2(c1(x)) + shortcut(c1(x))` the next conv sees the longer path's field (c2's 5
    pixels, not the 1x1 shortcut's 3) grown by its own 3x3: 7, though its window is drawn on the
    latest layer of that shape (the shortcut)."""
    import flax.linen as nn

    from cnn_jax.layers import Conv

    class Residual(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            y = Conv(4, (3, 3), padding="SAME", name="c1")(x)
            y = Conv(4, (3, 3), padding="SAME", name="c2")(y) + Conv(4, (1, 1), name="sc")(y)
            return Conv(4, (3, 3), padding="SAME", name="c3")(nn.relu(y))

    got = [(l.name, l.source, l.rf_size, l.rf_start) for l in describe(Residual(), (1, 9, 9, 1))]
    assert got == [
        ("c1", -1, (3, 3), (-1, -1)),
        ("c2", 0, (5, 5), (-2, -2)),
        ("sc", 0, (3, 3), (-1, -1)),
        ("c3", 2, (7, 7), (-3, -3)),
    ]


def test_answer_equals_layer_activations_and_probabilities(trained, explorer):
    """One request's maps and softmax are `predict.layer_activations` and `predict_probs` of
    the same image, decoded as `predict.read_image` decodes a file."""
    config, model, state = trained
    response = explorer.predict(drawing("7"), "image/png")
    image = np.frombuffer(base64.b64decode(response["image"]), np.uint8).reshape(8, 8, 1)
    x = predict.preprocess_for_model(config, image[None])
    expected = list(predict.layer_activations(model, state.variables(), x).values())
    assert len(expected) == 4
    for layer, b64, want in zip(explorer.layers, response["maps"], expected):
        np.testing.assert_allclose(f32(b64).reshape(layer.shape), want, atol=1e-5)
    np.testing.assert_allclose(f32(response["input"]).reshape(32, 32, 1), x[0], atol=1e-6)
    probs = predict.predict_probs(config, model, state.variables(), image[None])[0]
    np.testing.assert_allclose(response["probs"], probs, atol=1e-5)
    assert response["class_name"] == "7" and response["predicted"] == 7
    # the raw-pixel form of the same image gives the same answer
    raw = explorer.predict(image.tobytes(), "application/octet-stream")
    assert raw["maps"] == response["maps"] and raw["inverted"] is False


def test_paper_image_is_inverted(explorer):
    """A dark digit on white paper is inverted to match the light-on-dark digits (as predict
    does), and says so."""
    on_paper = explorer.predict(drawing("7", light=True), "image/png")
    as_drawn = explorer.predict(drawing("7"), "image/png")
    assert on_paper["inverted"] is True and as_drawn["inverted"] is False
    assert on_paper["maps"] == as_drawn["maps"]


# ----------------------------------------------------------------------------------------------
# HTTP: the page's files, the API, bad requests
# ----------------------------------------------------------------------------------------------


def test_page_files_are_served_and_need_nothing_from_outside(server):
    for path, kind in (("/", "text/html"), ("/app.js", "text/javascript"),
                       ("/style.css", "text/css")):  # fmt: skip
        status, body = request(server, "GET", path)
        assert status == 200 and body, path
    for f in STATIC.iterdir():  # no CDN scripts, fonts or images: the page works offline
        text = f.read_text()
        assert not re.search(r"(https?:)?//[\w.-]+\.\w+/", text), f"{f.name} loads from outside"
        assert "@import" not in text and "url(" not in text, f.name
    status, meta = request(server, "GET", "/api/meta")
    assert status == 200 and meta["native_shape"] == [8, 8, 1]
    assert [l["name"] for l in meta["layers"]][:4] == [
        "block1/conv1", "block1/pool", "block2/conv1", "block2/pool"
    ]  # fmt: skip
    assert meta["layers"][1]["window"] == [2, 2] and meta["class_names"][7] == "7"


def test_static_files_are_package_data():
    """pyproject.toml ships every file of static/ in the wheel (package-data), and the package
    is listed."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {"cnn_jax.explore", "cnn_jax.explore.static"} <= set(tool["packages"])
    patterns = tool["package-data"]["cnn_jax.explore.static"]
    for f in STATIC.iterdir():
        assert any(fnmatch(f.name, p) for p in patterns), f.name


def png_of_size(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (w, h)).save(buf, "PNG")  # tiny file, huge canvas
    return buf.getvalue()


BAD_REQUESTS = [
    # (method, path, body, headers, status, message fragment)
    ("POST", "/api/predict", b"\x00" * 10, {"Content-Type": "application/octet-stream"}, 400,
     "expected 64 bytes (8x8x1 uint8"),
    ("POST", "/api/predict", b"hello", {"Content-Type": "text/plain"}, 400,
     "is not a PNG, JPEG"),
    ("POST", "/api/predict", drawing("1")[:200], {"Content-Type": "image/png"}, 400,
     "could not be decoded"),
    ("POST", "/api/predict", b"", {"Content-Type": "image/png"}, 400, "is empty"),
    ("POST", "/api/predict", png_of_size(5000, 5000), {"Content-Type": "image/png"}, 413,
     "5000x5000 pixels"),
    ("POST", "/api/predict", b"\x00" * (server_lib.MAX_BODY_BYTES + 1),
     {"Content-Type": "image/png"}, 413, "at most 8,388,608"),
    ("GET", "/api/predict", None, {}, 405, "POST an image"),
    ("PUT", "/api/predict", b"x", {}, 405, "PUT is not served"),
    ("GET", "/etc/passwd", None, {}, 404, "no such page"),
    ("POST", "/api/other", b"x", {}, 404, "no such endpoint"),
    ("GET", "/api/meta", None, {"Host": "evil.example:80"}, 421, "is not this server"),
]  # fmt: skip


@pytest.mark.parametrize("method, path, body, headers, status, fragment", BAD_REQUESTS)
def test_bad_request_gets_4xx_and_server_goes_on(server, method, path, body, headers, status,
                                                 fragment):  # fmt: skip
    got, reply = request(server, method, path, body, headers)
    assert got == status and fragment in reply["error"], reply
    ok, _ = request(server, "POST", "/api/predict", drawing("1"), {"Content-Type": "image/png"})
    assert ok == 200


def test_malformed_http_gets_4xx(server, monkeypatch):
    host = f"Host: 127.0.0.1:{server.port}\r\n".encode()
    head = b"POST /api/predict HTTP/1.1\r\n" + host
    cases = [
        (head + b"Content-Type: image/png\r\n\r\n", 411, "Content-Length header is required"),
        (head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411, "chunked"),
        (head + b"Content-Length: abc\r\n\r\n", 400, "not a byte count"),
        (head + b"Content-Length: 10000000000\r\n\r\n", 413, "at most"),  # a lie: closed
        (head + b"Content-Length: 100\r\n\r\n" + b"x" * 10, 400, "ended after 10 of its 100"),
    ]
    monkeypatch.setattr(server_lib.Handler, "timeout", 1)  # the client that stops sending
    for data, status, fragment in cases:
        got, reply = raw_request(server, data)
        assert got == status and fragment in reply["error"], (data, reply)
    assert request(server, "GET", "/api/meta")[0] == 200


def test_concurrent_requests_and_timings(server):
    """Eight clients at once all get their answer; /api/stats reports the timings."""
    bodies = [drawing(s) for s in "1707" * 2]
    results = [None] * len(bodies)

    def send(i):
        results[i] = request(server, "POST", "/api/predict", bodies[i],
                             {"Content-Type": "image/png"})  # fmt: skip

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r[0] for r in results] == [200] * 8
    assert [r[1]["class_name"] for r in results] == list("1707" * 2)
    status, stats = request(server, "GET", "/api/stats")
    assert status == 200 and stats["requests"] >= 8
    assert 0 < stats["model"]["median"] <= stats["total"]["median"] < 2000


# ----------------------------------------------------------------------------------------------
# A real browser: Chromium (Debian's) driven by Selenium through Debian's chromedriver
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def browser():
    """Headless Chromium; skipped where it is missing, saying how to install it (a failure in
    CI, whose .ci/run installs it)."""
    reason = browser_missing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser tests: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # never a browser of Selenium's own: nothing downloads
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1300,1400", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def settled_after(driver, count: int, timeout: float = 20) -> int:
    """Waits until the page has more than `count` answers and none pending; the new count."""
    from selenium.webdriver.support.ui import WebDriverWait

    body = driver.find_element("tag name", "body")

    def done(_):
        n = int(body.get_attribute("data-requests"))
        return n if n > count and body.get_attribute("data-busy") == "0" else False

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(done)


def draw(driver, points):
    """A stroke through `points` (pad pixels from its top-left corner) with the mouse."""
    from selenium.webdriver.common.action_chains import ActionChains

    pad = driver.find_element("id", "pad")
    to_centre = lambda p: (int(p[0] - PAD / 2), int(p[1] - PAD / 2))
    chain = ActionChains(driver, duration=5).move_to_element_with_offset(pad, *to_centre(points[0]))
    chain.click_and_hold()
    for a, b in itertools.pairwise(points):  # in steps of ~10 px, as a hand moves
        for t in np.linspace(0, 1, max(2, int(np.hypot(b[0] - a[0], b[1] - a[1]) / 10)))[1:]:
            chain.move_to_element_with_offset(
                pad, *to_centre((a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])))
            )
    chain.release().perform()


def hover(driver, canvas, i, j):
    """The mouse over unit (row i, col j) of a map canvas."""
    from selenium.webdriver.common.action_chains import ActionChains

    rect = driver.execute_script("return arguments[0].getBoundingClientRect()", canvas)
    scale = rect["width"] / int(canvas.get_attribute("width"))
    x, y = (j + 0.5) * scale - rect["width"] / 2, (i + 0.5) * scale - rect["height"] / 2
    ActionChains(driver, duration=5).move_to_element_with_offset(canvas, int(x), int(y)).perform()
    return scale


def box(driver, layer: str, channel: int, kind: str):
    """(rows, cols) a highlight box outlines (data attributes), or None when hidden."""
    e = driver.find_element("css selector", f"{layer} .map:nth-child({channel + 1}) .box.{kind}")
    if e.value_of_css_property("display") == "none":
        return None
    rows, cols = e.get_attribute("data-rows"), e.get_attribute("data-cols")
    return tuple(map(int, rows.split(","))), tuple(map(int, cols.split(",")))


def map_pixels(driver, layer: str) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0] + ' canvas')].map(c => c.toDataURL())",
        layer,
    )


def drop(driver, name: str, data: bytes, kind: str):
    """Drops a file on the pad, as a person dragging it from their desktop would."""
    driver.execute_script(
        """const [name, b64, kind] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: kind}));
        document.getElementById('pad-wrap').dispatchEvent(
            new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));""",
        name, base64.b64encode(data).decode(), kind,
    )  # fmt: skip


def test_draw_hover_and_drop_in_chromium(server, browser, tmp_path):
    d = browser
    d.get(server.url)
    n = settled_after(d, 0)  # the blank pad, answered on load
    text = lambda id_: d.find_element("id", id_).text
    blank = map_pixels(d, "#layer-1")
    assert len(blank) == 6

    # a '1' then a '7': the predicted class and the maps follow the drawing
    draw(d, [(140, 30), (140, 250)])
    n = settled_after(d, n)
    assert text("predicted-class") == "1"
    one = map_pixels(d, "#layer-1")
    assert one != blank
    d.find_element("id", "clear").click()
    n = settled_after(d, n)
    draw(d, [(60, 40), (220, 40), (120, 250)])
    n = settled_after(d, n)
    assert text("predicted-class") == "7"
    seven = map_pixels(d, "#layer-1")
    assert seven != one and map_pixels(d, "#layer-3") != blank
    assert d.find_element("css selector", "#prob-7").get_attribute("class") == "prob-row best"
    assert re.search(r"model \d+\.\d ms", text("status")), text("status")
    assert not [e for e in d.get_log("browser") if e["level"] == "SEVERE"]

    # hover pooled unit (7, 9) of block1/pool channel 2: its 2x2 window in block1/conv1's
    # channel 2 (a pooling reads its own channel only) and the 6x6 receptive field in the input
    pooled = d.find_element("css selector", "#layer-1 canvas[data-channel='2']")
    hover(d, pooled, 7, 9)
    assert box(d, "#layer-1", 2, "unit") == ((7, 7), (9, 9))
    assert box(d, "#layer-0", 2, "window") == ((14, 15), (18, 19))
    assert box(d, "#layer-0", 1, "window") is None
    assert box(d, "#layer-input", 1, "field") == ((14, 19), (18, 23))
    assert "block1/pool channel 2, unit (7, 9)" in text("hover-info")
    assert "receptive field in the input: rows 14–19, cols 18–23 (6×6" in text("hover-info")
    # the window's box sits on those units of the conv map, drawn where a person sees it
    conv = d.find_element("css selector", "#layer-0 .map:nth-child(3)")
    window = conv.find_element("css selector", ".box.window")
    scale = 84 // 28
    assert window.location["x"] - conv.location["x"] == 18 * scale - 2
    assert window.location["y"] - conv.location["y"] == 14 * scale - 2
    assert window.size["width"] == 2 * scale + 4
    d.save_screenshot(str(tmp_path / "explorer.png"))
    shot = np.asarray(Image.open(tmp_path / "explorer.png").convert("RGB")).astype(int)
    orange = (np.abs(shot - [0xFF, 0x9F, 0x1A]).sum(-1) < 30).sum()
    green = (np.abs(shot - [0x38, 0xD6, 0x6B]).sum(-1) < 30).sum()
    assert orange > 20 and green > 20  # the outlines are on screen (the 7's bar is green too)

    # a unit of block2/conv1 reads every channel of block1/pool: a 5x5 window in each
    conv2 = d.find_element("css selector", "#layer-2 canvas[data-channel='0']")
    hover(d, conv2, 3, 4)
    for ch in range(6):
        assert box(d, "#layer-1", ch, "window") == ((3, 7), (4, 8))
    assert box(d, "#layer-input", 1, "field") == ((6, 19), (8, 21))  # 14x14

    # a dropped photo of a dark '0' on paper: inverted, classified, painted on the pad
    drop(d, "zero.png", drawing("0", light=True), "image/png")
    n = settled_after(d, n)
    assert text("predicted-class") == "0" and "inverted" in text("status")
    # a dropped file that is not an image: the server's message, and the page goes on
    drop(d, "notes.txt", b"not an image", "text/plain")
    n = settled_after(d, n)
    assert "notes.txt: " in text("status") and "is not a PNG, JPEG" in text("status")
    draw(d, [(140, 30), (140, 250)])
    n = settled_after(d, n)
    assert d.find_element("tag name", "body").get_attribute("data-error") == ""
    d.save_screenshot(str(tmp_path / "explorer_end.png"))


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(trained, tmp_path_factory):
    """A training workdir of the trained model (config.json and one checkpoint), written with
    the project's checkpoint store as the training loop writes it."""
    from cnn_jax.train.checkpoints import CheckpointStore

    config, _, state = trained
    path = tmp_path_factory.mktemp("explore") / "run"
    path.mkdir()
    (path / "config.json").write_text(config_lib.config_to_json(config) + "\n")
    store = CheckpointStore(path, async_save=False)
    store.save(150, jax.device_get(state), {"step": 150, "num_classes": 10,
                                            "image_shape": [32, 32, 1]})  # fmt: skip
    store.close()
    return path


def test_cli_serves_until_ctrl_c(workdir, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
           "TFDS_DATA_DIR": str(tmp_path / "tfds")}  # fmt: skip
    argv = [sys.executable, "-m", "cnn_jax", "explore", "--workdir", str(workdir), "--port", "0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)  # fmt: skip
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("open http" in x for x in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        url = re.search(r"open (http://127\.0\.0\.1:(\d+)/)", "".join(lines))
        assert url, "".join(lines) + proc.stderr.read()
        assert "explore: lenet5 from" in lines[0] and "compiled in" in lines[0]

        class At:
            port = int(url.group(2))

        status, reply = request(At, "POST", "/api/predict", drawing("1"),
                                {"Content-Type": "image/png"})  # fmt: skip
        assert status == 200 and reply["class_name"] == "1"
        assert request(At, "GET", "/")[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert re.search(r"1 predictions: model \d+\.\d ms median", out), out
    assert "Traceback" not in err


def test_cli_port_in_use_and_missing_workdir(workdir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        code = cli.main(["explore", "--workdir", str(workdir), "--port", str(port)])
        _, err = capsys.readouterr()
    assert code == 2 and f"--port {port}: 127.0.0.1:{port} is already in use" in err
    assert time.monotonic() - started < 5  # said before loading and compiling the model
    code = cli.main(["explore", "--workdir", str(workdir), "--port", "70000"])
    assert code == 2 and "--port 70000 is not a TCP port" in capsys.readouterr().err
    code = cli.main(["explore", "--workdir", str(workdir.parent / "nope")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
