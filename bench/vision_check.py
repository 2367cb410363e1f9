"""The vision fixture in llama-cpp-python's libmtmd against llama-server with `--mmproj`, on the
same two files: same prompt token count, same greedy tokens.

No small vision model is on the package index, so tests/vision_fixture.py builds one as SmolVLM
is built: SmolLM2 with SmolVLM's added tokens as the text model, and an Idefics3 projector of
random weights (a throwaway folder, a few seconds). One side is libmtmd driven through
llama-cpp-python's bindings (tests/mtmd_reference.py, as its `MTMDChatHandler` does), the other
llama-server built from the same vendored llama.cpp. Two checks per image set:
- raw prompt: llama-server's `/completion` with `multimodal_data` against the same text
  (llama-server's own media marker, read from `/props`): prompt tokens (`tokens_evaluated`)
  and the greedy tokens (`return_tokens`);
- chat: `/v1/chat/completions` with the image as an `image_url` data URI, against the prompt
  llama-server renders for it (`/apply-template`): `usage.prompt_tokens` and the answer's text.
Written to bench/results/vision.md.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
from pathlib import Path

import httpx
from servers import Server, free_port, llama_server_binary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from myllm.runtime.engine.llama_setup import cpu_has_amx  # noqa: E402
from tests.mtmd_reference import Reference  # noqa: E402
from tests.vision_fixture import png_image, write_vision_model  # noqa: E402

QUESTION = "What is in this image?"
IMAGE_SETS = {
    "16x16 (2x2 tiles)": [(16, 16, 1)],
    "64x32 (2x1 tiles)": [(64, 32, 2)],
    "8x40 (1x2 tiles)": [(8, 40, 3)],
    "two images": [(16, 16, 1), (64, 32, 2)],
}


def data_uri(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def completion(url: str, prompt: str, images: list[bytes], n_predict: int) -> tuple[int, list[int]]:
    r = httpx.post(f"{url}/completion", timeout=300, json={
        "prompt": {"prompt_string": prompt, "multimodal_data": [base64.b64encode(i).decode() for i in images]},
        "n_predict": n_predict, "temperature": 0, "cache_prompt": False, "return_tokens": True})
    r.raise_for_status()
    body = r.json()
    return int(body["tokens_evaluated"]), list(body["tokens"])


def chat(url: str, images: list[bytes], n_predict: int) -> tuple[str, int, str]:
    """(the prompt llama-server renders, its prompt token count, its answer)."""
    messages = [{"role": "user", "content": [
        *({"type": "image_url", "image_url": {"url": data_uri(i)}} for i in images),
        {"type": "text", "text": QUESTION}]}]
    rendered = httpx.post(f"{url}/apply-template", json={"messages": messages}, timeout=60)
    rendered.raise_for_status()
    r = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
        "messages": messages, "max_tokens": n_predict, "temperature": 0, "cache_prompt": False})
    r.raise_for_status()
    body = r.json()
    return rendered.json()["prompt"], int(body["usage"]["prompt_tokens"]), body["choices"][0]["message"]["content"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--llama-server", help="llama-server binary (default: make bench's, built once)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "vision.md")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="myllm-bench-vision-"))
    model = write_vision_model(folder)
    ref = Reference(model.text, model.projector, n_ctx=2048, n_threads=2)
    port = free_port()
    server = Server("llama-server", [
        args.llama_server or llama_server_binary(), "-m", str(model.text), "--mmproj", str(model.projector),
        "-t", "2", "-c", "2048", "-np", "1", "--port", str(port), "--host", "127.0.0.1", "--jinja",
        *(["--no-repack"] if cpu_has_amx() else [])], dict(os.environ), port)
    rows, agree, checks = [], 0, 0
    try:
        marker = httpx.get(f"{server.url}/props", timeout=30).json()["media_marker"]
        for label, specs in IMAGE_SETS.items():
            images = [png_image(w, h, seed) for w, h, seed in specs]
            prompt = f"<|im_start|>user\n{marker * len(images)}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
            n_there, tokens_there = completion(server.url, prompt, images, args.max_tokens)
            here = ref.run(prompt.replace(marker, ref.marker), images, args.max_tokens)
            same = (here.n_tokens, here.generated) == (n_there, tokens_there)
            rows.append(f"| {label} | /completion | {here.n_tokens} / {n_there} | {len(here.images)} x "
                        f"{here.images[0].n_tokens} | {len(here.generated)} / {len(tokens_there)} tokens | "
                        f"{'yes' if same else 'NO'} |")
            rendered, n_chat, text_there = chat(server.url, images, args.max_tokens)
            here = ref.run(rendered.replace(marker, ref.marker), images, args.max_tokens)
            text_here = ref.detokenize(here.generated)
            same_chat = (here.n_tokens, text_here) == (n_chat, text_there)
            rows.append(f"| {label} | /v1/chat/completions | {here.n_tokens} / {n_chat} | {len(here.images)} x "
                        f"{here.images[0].n_tokens} | {text_here!r} / {text_there!r} | {'yes' if same_chat else 'NO'} |")
            agree += same + same_chat
            checks += 2
    finally:
        server.stop()
        ref.close()
        for path in (model.text, model.projector):
            path.unlink()
        folder.rmdir()
    text = "\n".join([
        "The vision fixture (SmolLM2 + a random-weight Idefics3 projector, tests/vision_fixture.py) in "
        "llama-cpp-python's libmtmd (bindings, tests/mtmd_reference.py) against llama-server `--mmproj` on the "
        f"same files, temperature 0, {args.max_tokens} tokens. Prompt tokens and answers: bindings / llama-server; "
        "image chunks: tiles and overview x embeddings each.",
        "", "| images | endpoint | prompt tokens | image chunks | answer | same |", "| --- | --- | --- | --- | --- | --- |",
        *rows, "", f"{agree} of {checks} the same."])
    args.results.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
