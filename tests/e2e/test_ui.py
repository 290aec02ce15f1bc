"""The web page (service/ui) in a real headless browser against a real ``bentoml serve`` in keys mode.

Playwright drives Debian's ``chromium`` (``make data`` installs it; Playwright's own browser download does
not work offline). Each test takes screenshots of the pages it reaches, at desktop and phone sizes, into a
temporary folder, or into ``GRAFT_SCREENSHOTS_DIR`` (``make screenshots`` refreshes ``docs/screenshots``).
"""

import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from adapters.kinds import KINDS
from adapters.recipe import CLASS_WEIGHTINGS, OBJECTIVES, SCALINGS
from client import connect
from harness.sample_data import fashion_mnist_pngs, textile_files
from harness.screenshots import record_digest
from harness.servers import Server, make_tenant_key, start_server
from service.kind_choice import AUTO_KIND, auto_description
from service.resources import ExportFormat

CHROMIUM = Path("/usr/bin/chromium")
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
CLASSES = ("global", "local", "nominal")  # the textile folders, as textile_files orders them
TIMEOUT_MS = 120_000  # uploads and training on 2 busy cores
MONITOR_WINDOW = 30  # images per monitoring window: the smallest a drift test runs on
# Every text the training status shows, as the job's server-sent events arrive.
SEEN_PROGRESS = """() => {
  window.seenProgress = [];
  const status = document.getElementById("train-text");
  new MutationObserver(() => window.seenProgress.push(status.textContent))
    .observe(status, { childList: true, characterData: true, subtree: true });
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("ui"),
        GRAFT_AUTH="keys",
        GRAFT_BACKBONES='["mobilenet_v2"]',
        GRAFT_MONITOR_WINDOW=str(MONITOR_WINDOW),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key(server: Server) -> str:
    return make_tenant_key(server, "ui")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (`make data` does)")
    with sync_playwright() as playwright:
        # Chromium's fake camera (a test pattern) stands in for a webcam, allowed without asking.
        args = ["--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=DESKTOP)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Iterator[Path]:
    """Where the pictures go; into GRAFT_SCREENSHOTS_DIR with the digest of the page they show."""
    folder = os.environ.get("GRAFT_SCREENSHOTS_DIR")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    yield path
    record_digest(path)


def shoot(page: Page, folder: Path, name: str) -> None:
    """The page at desktop and phone width: ``{name}-desktop.png`` and ``{name}-phone.png``."""
    for size, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        page.set_viewport_size(viewport)
        page.screenshot(path=folder / f"{name}-{size}.png", full_page=True)
    page.set_viewport_size(DESKTOP)


def sign_in(page: Page, server: Server, key: str) -> None:
    page.goto(server.http_url)
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Your heads")).to_be_visible()


def open_page(page: Page, name: str) -> None:
    page.get_by_role("navigation", name="Pages").get_by_role("link", name=name).click()


def unlabelled_controls(page: Page) -> list[str]:
    """Form controls on the shown page that a screen reader could not name."""
    return page.evaluate("""() => [...document.querySelectorAll("input, select, textarea")]
        .filter((control) => control.labels.length === 0 && !control.getAttribute("aria-label"))
        .map((control) => control.outerHTML)""")


def image(name: str, data: bytes, mime: str = "image/jpeg") -> dict:
    return {"name": name, "mimeType": mime, "buffer": data}


def add_classes(page: Page, per_class: int) -> None:
    """Three classes of textile images, through each class's file picker (the page starts with two)."""
    page.get_by_role("button", name="Add a class").click()
    for n, label in enumerate(CLASSES, start=1):
        page.locator(f"#class-name-{n}").fill(label)
        files = [image(name.split("/")[1], data) for name, data, lbl in textile_files(per_class) if lbl == label]
        page.locator(f"#class-files-{n}").set_input_files(files)
        expect(page.locator(".class-card").nth(n - 1).locator(".count")).to_have_text(f"{per_class} images")


def test_page_refuses_a_wrong_key_with_the_servers_message_and_accepts_a_valid_one(page, server, key, screenshots):
    page.goto(server.http_url)  # "/" sends the browser to the page
    expect(page).to_have_url(f"{server.http_url}/ui/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()

    page.get_by_label("API key").fill("graft_not-a-real-key")
    page.get_by_role("button", name="Sign in").click()
    refusal = page.get_by_role("alert").filter(has_text="The service refused this key")
    expect(refusal).to_be_visible()
    shoot(page, screenshots, "sign-in")
    expect(page.get_by_role("navigation", name="Pages")).to_be_hidden()

    page.get_by_label("API key").fill(key)
    page.get_by_label("API key").press("Enter")  # the keyboard is enough
    expect(page.get_by_role("heading", name="Your heads")).to_be_visible()
    expect(page.get_by_text("No heads yet")).to_be_visible()


def test_a_file_the_server_refuses_shows_its_message_next_to_it(page, server, key):
    sign_in(page, server, key)
    open_page(page, "New model")
    page.get_by_label("Model name").fill("refused")
    add_classes(page, per_class=2)
    page.locator("#class-files-2").set_input_files([image("broken.jpg", b"this is not a JPEG")])
    page.get_by_role("button", name="Upload and train").click()

    broken = page.locator(".thumb").filter(has_text="broken.jpg")
    expect(broken.locator(".file-error")).to_contain_text("file 'local/broken.jpg' is not a decodable image")
    expect(page.locator("#new-error")).to_contain_text("refused a file")
    assert page.locator(".file-error:not(:empty)").count() == 1, "only the refused file shows an error"
    assert (
        httpx.get(f"{server.http_url}/v1/datasets", headers={"Authorization": f"Bearer {key}"}).json()["datasets"] == []
    ), "nothing was stored"


def test_the_kinds_offered_are_the_servers_each_with_its_description_and_the_settings_it_takes(page, server, key):
    sign_in(page, server, key)
    open_page(page, "New model")
    kind = page.get_by_label("Kind of head")
    expect(kind.locator("option")).to_have_text([*KINDS, AUTO_KIND])
    expect(kind).to_have_value(next(iter(KINDS)))
    for name, spec in KINDS.items():
        kind.select_option(name)
        expect(page.locator("#kind-help")).to_have_text(spec.description)
        expect(page.locator("#epochs")).to_be_enabled(enabled=spec.searched)
        expect(page.locator("#finetune-blocks")).to_be_enabled(enabled=spec.copies_tail)
        expect(page.locator("#scaling")).to_be_enabled(enabled=bool(spec.scalings))
        expect(page.locator("#class-weighting")).to_be_enabled(enabled=spec.class_weighting is not None)
    kind.select_option(AUTO_KIND)  # auto trains each candidate with its defaults
    expect(page.locator("#kind-help")).to_have_text(auto_description())
    expect(page.locator("#epochs")).to_be_disabled()
    expect(page.locator("#scaling")).to_be_enabled()  # passed on to the candidates that take it
    expect(page.locator("#class-weighting")).to_be_enabled()


def test_the_recipe_choices_offered_are_the_servers_and_the_chosen_ones_are_sent(page, server, key):
    sign_in(page, server, key)
    open_page(page, "New model")
    page.get_by_text("Advanced settings").click()
    chosen = {}
    for label, field, registry in (
        ("Objective", "objective", OBJECTIVES),
        ("Class weighting", "class_weighting", CLASS_WEIGHTINGS),
        ("Feature scaling", "scaling", SCALINGS),
    ):
        choice = page.get_by_label(label, exact=True)
        expect(choice.locator("option")).to_have_text(["default", *registry])
        expect(choice).to_have_value("")  # left out of the spec: the server decides
        chosen[field] = list(registry)[-1]
        choice.select_option(chosen[field])
    page.get_by_label("Kind of head").select_option(next(name for name, spec in KINDS.items() if spec.scalings))
    page.get_by_label("Model name").fill("recipe")
    add_classes(page, per_class=2)

    sent: list[dict] = []

    def refuse(route) -> None:  # the spec is what this test is about, not the training
        sent.append(route.request.post_data_json)
        route.fulfill(status=400, json={"code": "invalid_argument", "message": "not trained by this test"})

    page.route("**/v1/jobs", refuse)
    page.get_by_role("button", name="Upload and train").click()
    expect(page.locator("#new-error")).to_contain_text("not trained by this test")
    assert {field: sent[0].get(field) for field in chosen} == chosen


def test_teach_three_classes_train_with_live_progress_and_try_a_held_out_image(page, server, key, screenshots):
    sign_in(page, server, key)
    open_page(page, "New model")
    expect(page.get_by_label("Backbone", exact=True)).to_have_value("mobilenet_v2")
    page.get_by_label("Model name").fill("weave")
    add_classes(page, per_class=30)
    assert unlabelled_controls(page) == []
    shoot(page, screenshots, "new-model")

    page.evaluate(SEEN_PROGRESS)
    page.get_by_role("button", name="Upload and train").click()
    expect(page.locator("#upload-text")).to_have_text("90 images stored", timeout=TIMEOUT_MS)
    expect(page.locator("#train-text")).to_have_text("done: weave version 1", timeout=TIMEOUT_MS)
    seen = page.evaluate("window.seenProgress")
    assert any(text.startswith("running: extract") for text in seen), f"no live progress shown: {seen}"
    results = page.get_by_role("region", name="Results")
    expect(results.locator(".accuracy")).to_have_text(re.compile(r"^\d+\.\d %$"))
    matrix = results.locator(".confusion-matrix")
    expect(matrix.locator("tbody tr")).to_have_count(3)
    expect(matrix.locator("tbody td")).to_have_count(9)
    shoot(page, screenshots, "trained")

    version_fetches: list[str] = []
    page.on("request", lambda request: version_fetches.append(request.url.removeprefix(server.http_url)))
    open_page(page, "Your heads")
    expect(page.get_by_role("heading", name="weave")).to_be_visible()
    page.get_by_label("Alias", exact=True).fill("prod")
    page.get_by_role("button", name="Set alias").click()
    expect(page.get_by_text("weave:prod")).to_be_visible()
    assert not [url for url in version_fetches if "/versions/" in url], "whole metrics fetched before being opened"
    page.get_by_text("Hold-out metrics of version 1").click()
    metrics = page.locator(".version-metrics")
    expect(metrics.locator(".confusion-matrix tbody td")).to_have_count(9)  # the whole metrics, fetched on opening
    expect(metrics.locator(".per-class tbody tr")).to_have_count(3)
    assert [url for url in version_fetches if "/versions/" in url] == ["/v1/heads/weave/versions/1"]
    shoot(page, screenshots, "heads")
    expect(page.locator(".versions .actions button")).to_have_text([f.value for f in ExportFormat])
    with page.expect_download() as download:
        page.get_by_role("button", name="Download weave version 1 as safetensors").click()
    assert download.value.suggested_filename.endswith(".safetensors")

    # A held-out image of 'global' (whole-fabric defects), the class this small head tells apart on every
    # hold-out image; small 'local' defects are sometimes taken for 'nominal' at 224 px.
    name, data, label = textile_files(per_class=1, offset=400)[0]
    open_page(page, "Try it")
    expect(page.get_by_label("weave (latest, v1)")).to_be_checked()
    page.get_by_label("weave:prod (v1)").check()
    page.locator("#try-file").set_input_files([image(name.split("/")[1], data)])
    answers = page.locator(".result")
    expect(answers).to_have_count(2)  # latest and prod, side by side
    assert unlabelled_controls(page) == []
    top_label = answers.first.locator(".top-label").inner_text()
    shoot(page, screenshots, "try")

    reply = httpx.post(
        f"{server.http_url}/v1/predict:upload",
        files={"files": (name, data)},
        data={"heads": "weave"},
        headers={"Authorization": f"Bearer {key}"},
    ).json()
    assert top_label == reply["predictions"][0]["heads"][0]["top"][0]["label"] == label
    expect(answers.nth(1).locator(".top-label")).to_have_text(top_label)

    first_answer = answers.first.element_handle()
    page.get_by_role("button", name="Use the webcam").click()
    page.get_by_role("button", name="Take a picture").click()
    page.wait_for_function("answer => !answer.isConnected", arg=first_answer)  # the picture's answers replace it
    expect(answers).to_have_count(2)
    expect(answers.first.locator(".top-label")).to_have_text(re.compile(f"^({'|'.join(CLASSES)})$"))
    page.get_by_role("button", name="Stop the webcam").click()


def test_a_heads_shadow_comparison_and_drifting_traffic_show_on_its_card(page, server, screenshots):
    """A tenant of its own: head 'watch' with two versions trained on different images; version 1 shadows the
    latest, 2, which then serves a window of textiles and one of Fashion-MNIST clothes."""
    key = make_tenant_key(server, "watch")
    with connect(server.http_url, key) as graft:
        for offset in (0, 100):
            pairs = [(data, label) for _, data, label in textile_files(per_class=10, offset=offset)]
            dataset = graft.create_dataset(pairs, f"watch-{offset}")
            job = graft.wait(graft.train(dataset.name, "watch", kind="prototype").name)
            assert job.state == "succeeded", job.error
    sign_in(page, server, key)
    card = page.get_by_role("article", name="watch")
    expect(card.locator(".monitor-status .status")).to_have_text("ok")
    card.get_by_label("Shadow with").select_option("1")
    card.get_by_role("button", name="Set shadow").click()
    expect(card.get_by_text("Version 1 shadows this head")).to_be_visible()
    expect(card.locator(".versions tbody tr").nth(1).locator("td").nth(4)).to_have_text("(shadow)")  # version 1
    assert unlabelled_controls(page) == []

    held_out = [data for _, data, _ in textile_files(per_class=10, offset=400)]
    clothes = [data for data, _ in fashion_mnist_pngs("test", per_class=3, seed=1)][:MONITOR_WINDOW]
    with connect(server.http_url, key) as graft:
        answers = graft.predict(held_out, "watch", include_shadow=True)
        graft.predict(clothes, "watch")
    assert all(a.heads[0].version == 2 and a.heads[0].shadow.version == 1 for a in answers)  # type: ignore[union-attr]
    page.reload()
    card.get_by_text("Shadow against served").click()
    comparison = card.locator(".comparison")
    expect(comparison.get_by_role("heading")).to_have_text("Shadow version 1 beside served version 2")
    expect(comparison.locator("dd").first).to_have_text(str(len(held_out) + len(clothes)))
    expect(comparison.locator(".confusion-matrix tbody td")).to_have_count(len(CLASSES) ** 2)
    shoot(page, screenshots, "shadow")

    expect(card.locator(".monitor-status .status")).to_have_text("drifting")  # the version served: 2
    card.get_by_text("Live traffic of version 2", exact=True).click()
    monitoring = card.locator(".monitoring")
    expect(monitoring.get_by_role("alert")).to_contain_text("drifting since")
    expect(monitoring.locator(".chart svg")).to_have_count(4)
    expect(monitoring.locator(".drifting-window")).to_have_count(4)  # the second window, marked on each chart
    expect(monitoring.locator(".windows tbody tr")).to_have_count(2)
    expect(monitoring.locator(".windows tbody tr.drifting")).to_have_count(1)
    shoot(page, screenshots, "monitoring")


def test_the_label_page_shows_the_suggested_images_labels_them_by_click_and_key_and_retrains(page, server, screenshots):
    """A tenant of its own: a pool of textile images, 2 labelled per class, and head 'pool' trained on those."""
    key = make_tenant_key(server, "labeller")
    pairs = [(data, label if number % 20 < 2 else "") for number, (_, data, label) in enumerate(textile_files(20))]
    with connect(server.http_url, key) as graft:
        dataset = graft.create_dataset(pairs, "textile-pool")
        job = graft.wait(graft.train(dataset.name, "pool", kind="linear").name)
        assert job.state == "succeeded", job.error
    sign_in(page, server, key)
    open_page(page, "Label")
    page.get_by_label("Dataset", exact=True).select_option(dataset.name.removeprefix("datasets/"))
    page.get_by_label("Head that judges").select_option("pool")
    page.get_by_label("Images to suggest").fill("6")
    page.get_by_role("button", name="Suggest images to label").click()
    cards = page.locator(".label-card")
    expect(cards).to_have_count(6)
    expect(cards.first.locator("img")).to_have_js_property("complete", True)
    assert page.evaluate("() => [...document.querySelectorAll('.label-card img')].every(i => i.naturalWidth > 0)")
    assert unlabelled_controls(page) == []
    shoot(page, screenshots, "label")

    cards.first.get_by_role("button", name=re.compile(f"^\\d {CLASSES[0]}$")).click()  # a click
    expect(cards.first.get_by_role("button", name=re.compile(f"^\\d {CLASSES[0]}$"))).to_have_attribute(
        "aria-pressed", "true"
    )
    expect(cards.nth(1)).to_be_focused()  # labelling moves on to the next image
    page.keyboard.press("2")  # a key: the second class
    expect(cards.nth(1).locator(".label-done")).to_have_text(f"labelled {CLASSES[1]}")
    with connect(server.http_url, key) as graft:
        labelled = {e.index: e.label for e in graft.list_examples(dataset.name) if e.label is not None}
    assert len(labelled) == 3 * 2 + 2
    page.get_by_role("button", name="Retrain with 2 new labels").click()
    expect(page.locator("#label-status")).to_contain_text("heads/pool/versions/2 trained", timeout=TIMEOUT_MS)
    expect(cards).to_have_count(6)  # the next suggestions, judged by version 2
    with connect(server.http_url, key) as graft:
        assert graft.get_head_version("pool", 2).metrics["examples_used"] == 3 * 2 + 2
