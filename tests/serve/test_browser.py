"""The chat page of `llava-pipeline serve` in a real headless Chromium (Debian's `chromium` + `chromium-driver`,
driven by Selenium; nothing is downloaded): pick an image, ask, watch the answer stream in, ask again, start over.

Run as a script it takes the screenshot of docs/serve.md with a trained model:
    python tests/serve/test_browser.py --model runs/demo/instruct/final --image IMG --question Q --out docs/images/serve.png
"""
import argparse
import shutil
import sys
import time
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                           "chromium-driver; .ci/run installs them)")

# Records every text the answer bubble shows, so the test sees the streaming itself, not only the end.
WATCH_ANSWERS = """
window.seenTexts = [];
new MutationObserver(() => {
  document.querySelectorAll('.message.assistant').forEach((m, i) => {
    const texts = window.seenTexts[i] || (window.seenTexts[i] = []);
    if (texts[texts.length - 1] !== m.textContent) texts.push(m.textContent);
  });
}).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
"""


def open_browser(width=1280, height=800):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def wait(condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def set_value(driver, element_id, value):
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input'));", element_id, str(value))


def ask(driver, question):
    """Type and send a question; wait for its answer to finish streaming; return the answer bubble's text."""
    from selenium.webdriver.common.by import By

    before = len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    driver.find_element(By.ID, "prompt").send_keys(question)
    driver.find_element(By.ID, "send").click()
    wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant")) > before, "the answer bubble")
    bubble = driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[before]
    wait(lambda: "streaming" not in bubble.get_attribute("class") and driver.find_element(By.ID, "send").is_enabled(),
         "the answer to finish")
    return bubble.get_property("textContent")  # exactly the text (.text would normalise a random model's spaces)


def chat_in_page(driver, url, image: Path, questions, max_tokens):
    """Load the page, pick `image`, ask each question at temperature 0; return the answers."""
    from selenium.webdriver.common.by import By

    driver.get(url + "/")
    wait(lambda: driver.find_element(By.ID, "model-name").text.startswith("model: "), "the model name")
    driver.find_element(By.ID, "image-input").send_keys(str(image.resolve()))
    wait(lambda: driver.find_element(By.ID, "preview").is_displayed(), "the image preview")
    set_value(driver, "temperature", 0)
    set_value(driver, "max-tokens", max_tokens)
    driver.execute_script(WATCH_ANSWERS)
    return [ask(driver, question) for question in questions]


@needs_chromium
def test_page_chats_about_an_image_with_streamed_answers(serve, loaded, image_folder, tmp_path):
    from selenium.webdriver.common.by import By

    from llava.generate import GenerationConfig
    from pipeline.chat import ChatSession

    image, questions, max_tokens = image_folder / "mixed.png", ["What is in the image?", "And the colors?"], 12
    session = ChatSession(loaded, image, GenerationConfig(max_new_tokens=max_tokens,
                                                          stop_token_ids=loaded.stop_token_ids))
    expected = [session.ask(q) for q in questions]
    with serve() as (url, _app):
        driver = open_browser()
        try:
            answers = chat_in_page(driver, url, image, questions, max_tokens)
            assert [a.strip() for a in answers] == expected  # the page's conversation is chat's conversation
            seen = driver.execute_script("return window.seenTexts")
            first = [t for t in seen[0] if t]
            assert len(first) > 1, f"the first answer did not stream: {first}"
            assert all(answers[0].startswith(t.strip()) or t.startswith(answers[0]) for t in first)
            users = driver.find_elements(By.CSS_SELECTOR, ".message.user")
            assert [u.text for u in users] == questions
            assert users[0].find_element(By.TAG_NAME, "img").get_attribute("src").startswith("data:image/png")
            driver.save_screenshot(str(tmp_path / "page.png"))
            assert (tmp_path / "page.png").read_bytes()[:4] == b"\x89PNG"

            driver.find_element(By.ID, "new-chat").click()
            assert driver.find_elements(By.CSS_SELECTOR, ".message") == []
            set_value(driver, "max-tokens", 100000)  # more than the context: the server's message is shown
            driver.find_element(By.ID, "prompt").send_keys("Hello?")
            driver.find_element(By.ID, "send").click()
            error = wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".message.error"), "the error message")
            assert "400: this model's context is 512 tokens" in error[0].text
        finally:
            driver.quit()


def main(argv=None) -> int:
    """Take the documentation's screenshot with a trained model."""
    sys.path.insert(0, str(Path(__file__).parent))
    from serve_helpers import running

    from llava.loading import load_model
    from pipeline.serve import ServeSettings, create_app

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--question", action="append", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    loaded = load_model(args.model, device="cpu")
    with running(create_app(loaded, ServeSettings(model_name=loaded.model_id))) as url:
        driver = open_browser(1200, 720)
        try:
            for answer in chat_in_page(driver, url, args.image, args.question, args.max_tokens):
                print(answer)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
