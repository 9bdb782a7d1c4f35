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


async def run(app, input_path: Path, output_path: Path, concurrency: int, progress: bool = True) -> dict[str, int]:
    """Answer every line of INPUT not yet answered in OUTPUT, at most `concurrency` at once; returns counts (done,
    failed, skipped)."""
    import httpx
    from tqdm.auto import tqdm

    lines = read_input(input_path)
    ids, numbers = read_done(output_path)
    todo = {ln.number: ln for ln in lines
            if ln.number not in numbers and (ln.error is not None or ln.custom_id not in ids)}
    counts = {"done": 0, "failed": 0, "skipped": len(lines) - len(todo)}
    bar = tqdm(total=len(todo), desc="batch", unit="req", file=sys.stderr, disable=not progress)
    tokens, t0 = 0, time.monotonic()
    slots = asyncio.Semaphore(concurrency)
    with open(output_path, "a", encoding="utf-8") as out:

        def write(row: dict, ok: bool) -> None:
            nonlocal tokens
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())  # a result once written survives a crash or a power loss
            counts["done" if ok else "failed"] += 1
            usage = ((row.get("response") or {}).get("body") or {}).get("usage") or {}
            tokens += usage.get("completion_tokens", 0)
            bar.set_postfix(done=counts["done"], failed=counts["failed"],
                            remaining=len(todo) - counts["done"] - counts["failed"],
                            tok_s=f"{tokens / max(time.monotonic() - t0, 1e-9):.1f}")
            bar.update(1)

        async def answer(client, line: Line, body: dict) -> None:
            try:
                if body.get("stream"):
                    status, reply = 400, {"error": {"message": "stream is not supported in batch jobs",
                                                    "type": "invalid_request_error", "param": "stream",
                                                    "code": None}}
                else:
                    r = await client.post(URL, json=body, headers={"X-Request-Id": request_id(line)})
                    status = r.status_code
                    try:
                        reply = r.json()
                    except ValueError:
                        reply = {"error": {"message": r.text, "type": "server_error", "param": None, "code": None}}
            finally:
                slots.release()
            rid = request_id(line)  # the same on every run: a resumed job's file equals an uninterrupted one's
            write({"id": f"batch_req_{rid}", "custom_id": line.custom_id,
                   "response": {"status_code": status, "request_id": rid, "body": reply}, "error": None},
                  status == 200)

        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a crash in the app is a 500 line
        async with httpx.AsyncClient(transport=transport, base_url="http://qwen2vl-batch", timeout=None) as client:
            running = set()
            for number, raw in input_lines(input_path):
                line = todo.get(number)
                if line is None:
                    continue
                if line.error is not None:
                    write(error_line(line), False)
                    continue
                await slots.acquire()  # at most `concurrency` bodies in memory and in flight
                task = asyncio.create_task(answer(client, line, json.loads(raw)["body"]))
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.gather(*running)
    bar.close()
    return counts
