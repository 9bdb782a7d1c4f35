"""`qwen2vl batch INPUT.jsonl OUTPUT.jsonl`: an OpenAI Batch file answered by the server's own app, in process.

Each input line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}`. Its body goes to the
same FastAPI app `qwen2vl serve` runs (over an in-process ASGI transport), so it gets exactly the server's answer or
error, and requests share the server's engine (continuous batching, prefix cache). Each output line is
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`, written and fsynced as it
completes. A line that cannot be a request (not JSON, no custom_id, a repeated custom_id, another url) gets a line
whose `error` names its line number. Running the same command again skips every line that has a result: after a
crash, a kill or a power loss only the missing ones are done, and a torn last line is dropped and redone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

URL = "/v1/chat/completions"


@dataclass
class Line:
    number: int  # 1-based line number in INPUT
    custom_id: str | None
    error: tuple[str, str] | None  # (code, message) for a line that is not a request


def input_lines(path: Path):
    """(line number, text) of INPUT, read as a stream (bodies with images can make it large)."""
    try:
        with open(path, encoding="utf-8") as f:
            yield from enumerate(f, 1)
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the batch input {path}: {e}") from None


def read_input(path: Path) -> list[Line]:
    """What each non-blank line of INPUT is (its bodies are not kept); a repeated custom_id is an error line (the
    first one counts)."""
    lines, seen = [], {}
    for number, raw in input_lines(path):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as e:
            lines.append(Line(number, None, ("invalid_json", f"line {number}: not valid JSON ({e.msg})")))
            continue
        cid = item.get("custom_id") if isinstance(item, dict) else None
        if not isinstance(cid, str) or not cid:
            lines.append(Line(number, None, ("missing_custom_id", f"line {number}: no custom_id (a non-empty string)")))
        elif cid in seen:
            lines.append(Line(number, cid, ("duplicate_custom_id",
                                            f"line {number}: custom_id {cid!r} repeats line {seen[cid]}")))
        elif item.get("url", URL) != URL or str(item.get("method", "POST")).upper() != "POST":
            seen[cid] = number
            lines.append(Line(number, cid, ("invalid_url", f"line {number}: only POST {URL} is served, not "
                                            f"{item.get('method')} {item.get('url')}")))
        elif not isinstance(item.get("body"), dict):
            seen[cid] = number
            lines.append(Line(number, cid, ("missing_body", f"line {number}: no body (a JSON object)")))
        else:
            seen[cid] = number
            lines.append(Line(number, cid, None))
    return lines


def read_done(path: Path) -> tuple[set[str], set[int]]:
    """The custom_ids and the input line numbers (of error lines) OUTPUT already answers. A torn last line (a write
    cut short) is removed from the file, so its request is done again."""
    if not path.exists():
        return set(), set()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
    rows = data[:keep].split(b"\n")[:-1]
    ids, numbers = set(), set()
    for i, row in enumerate(rows):
        try:
            item = json.loads(row)
        except json.JSONDecodeError:
            if i < len(rows) - 1:
                raise InputError(f"{path} line {i + 1} is not JSON: fix or remove it before resuming") from None
            keep -= len(row) + 1  # a garbled last line: redo its request
            continue
        if (item.get("error") or {}).get("line") is not None:
            numbers.add(item["error"]["line"])
        elif item.get("custom_id") is not None:
            ids.add(item["custom_id"])
    if keep != len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    return ids, numbers


def request_id(line: Line) -> str:
    return hashlib.blake2b(f"{line.number}:{line.custom_id}".encode(), digest_size=12).hexdigest()


def error_line(line: Line) -> dict:
    code, message = line.error
    return {"id": f"batch_req_{request_id(line)}", "custom_id": line.custom_id, "response": None,
            "error": {"code": code, "message": message, "line": line.number}}


def app_client(app):
    """An HTTP client of the app in this process (no socket); a crash in the app comes back as a 500."""
    import httpx

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://qwen2vl-batch", timeout=None)


async def respond(client, line: Line, body: dict) -> dict:
    """The output line for one request: the app's status and body, exactly as the server would answer."""
    if body.get("stream"):
        status, reply = 400, {"error": {"message": "stream is not supported in batch jobs",
                                        "type": "invalid_request_error", "param": "stream", "code": None}}
    else:
        rid = request_id(line)  # the same on every run: a resumed job's file equals an uninterrupted one's
        try:
            r = await client.post(URL, json=body, headers={"X-Request-Id": rid})
            status = r.status_code
            try:
                reply = r.json()
            except ValueError:
                reply = {"error": {"message": r.text, "type": "server_error", "param": None, "code": None}}
        except Exception as e:  # noqa: BLE001 - a failing row never ends the job
            status, reply = 500, {"error": {"message": str(e), "type": "server_error", "param": None, "code": None}}
    rid = request_id(line)
    return {"id": f"batch_req_{rid}", "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": rid, "body": reply}, "error": None}


def pending(input_path: Path, output_path: Path) -> tuple[dict[int, Line], int]:
    """The lines of INPUT that OUTPUT does not answer yet (by line number), and how many it does."""
    lines = read_input(input_path)
    ids, numbers = read_done(output_path)
    todo = {ln.number: ln for ln in lines
            if ln.number not in numbers and (ln.error is not None or ln.custom_id not in ids)}
    return todo, len(lines) - len(todo)


class Results:
    """OUTPUT, appended to: each line written and fsynced as it comes (a result once written survives a crash or a
    power loss), with a progress bar on stderr and the counts."""

    def __init__(self, path: Path, total: int, skipped: int, progress: bool = True):
        from tqdm.auto import tqdm

        self.file = open(path, "a", encoding="utf-8")
        self.total, self.tokens, self.t0 = total, 0, time.monotonic()
        self.counts = {"done": 0, "failed": 0, "skipped": skipped}
        self.bar = tqdm(total=total, desc="batch", unit="req", file=sys.stderr, disable=not progress)

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        ok = row["error"] is None and row["response"]["status_code"] == 200
        self.counts["done" if ok else "failed"] += 1
        self.tokens += ((row.get("response") or {}).get("body") or {}).get("usage", {}).get("completion_tokens", 0)
        c = self.counts
        self.bar.set_postfix(done=c["done"], failed=c["failed"], remaining=self.total - c["done"] - c["failed"],
                             tok_s=f"{self.tokens / max(time.monotonic() - self.t0, 1e-9):.1f}")
        self.bar.update(1)

    def __enter__(self) -> "Results":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self.file.close()


def requests(input_path: Path, todo: dict[int, Line], results: Results):
    """(line, raw text) of each request to send; lines that are not requests get their error line here."""
    for number, raw in input_lines(input_path):
        line = todo.get(number)
        if line is None:
            continue
        if line.error is not None:
            results.write(error_line(line))
        else:
            yield line, raw


async def run(app, input_path: Path, output_path: Path, concurrency: int, progress: bool = True) -> dict[str, int]:
    """Answer every line of INPUT not yet answered in OUTPUT through `app`, at most `concurrency` at once; returns
    counts (done, failed, skipped)."""
    todo, skipped = pending(input_path, output_path)
    slots = asyncio.Semaphore(concurrency)
    with Results(output_path, len(todo), skipped, progress) as results:

        async def answer(client, line: Line, body: dict) -> None:
            try:
                results.write(await respond(client, line, body))
            finally:
                slots.release()

        async with app_client(app) as client:
            running = set()
            for line, raw in requests(input_path, todo, results):
                await slots.acquire()  # at most `concurrency` bodies in memory and in flight
                task = asyncio.create_task(answer(client, line, json.loads(raw)["body"]))
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.gather(*running)
    return results.counts
