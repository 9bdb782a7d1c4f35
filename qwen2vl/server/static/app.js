// The chat page: a client of this server's own /v1/chat/completions (no private API). Media go as data URIs, so the
// server's default media policy applies; its limits (in the page's config) are checked here first, with its words.
"use strict";

const config = JSON.parse(document.getElementById("config").textContent);
const $ = (id) => document.getElementById(id);
const BOX = /(?:<\|object_ref_start\|>([\s\S]*?)<\|object_ref_end\|>)?\s*<\|box_start\|>\s*\((\d+),\s*(\d+)\)\s*,\s*\((\d+),\s*(\d+)\)\s*<\|box_end\|>/g;
const state = { history: [], attachments: [], controller: null };

// ----------------------------------------------------------------------------------------------------------------
// Limits: the server's, in the server's words

function bodyBytes(body) { return new Blob([JSON.stringify(body)]).size; }

function refusal(messages) {
  const images = messages.at(-1).content.filter?.((p) => p.type === "image_url").length || 0;
  if (images > config.max_images) {
    return `${images} images in one request; this server accepts at most ${config.max_images}`;
  }
  const videos = messages.at(-1).content.filter?.((p) => p.type === "video_url").length || 0;
  if (videos > config.max_videos) {
    return `${videos} videos in one request; this server accepts at most ${config.max_videos}`;
  }
  if (bodyBytes(request(messages)) > config.max_body_bytes) return `request body over ${config.max_body_bytes} bytes`;
  return null;
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

// ----------------------------------------------------------------------------------------------------------------
// Attachments: picker, drag and drop, paste

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(files) {
  notice("");
  for (const file of files) {
    const kind = file.type.startsWith("image/") ? "image" : file.type.startsWith("video/") ? "video" : null;
    if (!kind) { notice(`${file.name}: not an image or a video`); continue; }
    const item = { name: file.name, kind, url: await readFile(file) };
    const why = refusal(pending([...state.attachments, item], $("prompt").value));
    if (why) { notice(`${file.name}: ${why}`); continue; }
    state.attachments.push(item);
  }
  showAttachments();
}

function showAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.attachments.forEach((item, i) => {
    const chip = document.createElement("div");
    chip.className = "chip";
    if (item.kind === "image") {
      const img = document.createElement("img");
      img.src = item.url;
      img.alt = "";
      chip.append(img);
    }
    const name = document.createElement("span");
    name.textContent = item.name;  // file names are text, never markup
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove ${item.name}`);
    remove.onclick = () => { state.attachments.splice(i, 1); showAttachments(); };
    chip.append(name, remove);
    box.append(chip);
  });
}

$("file-input").addEventListener("change", (e) => { addFiles([...e.target.files]); e.target.value = ""; });
document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
document.addEventListener("drop", (e) => {
  e.preventDefault();
  document.body.classList.remove("dragging");
  addFiles([...e.dataTransfer.files]);
});
$("prompt").addEventListener("paste", (e) => {
  const files = [...(e.clipboardData?.files || [])];
  if (files.length) { e.preventDefault(); addFiles(files); }
});

// ----------------------------------------------------------------------------------------------------------------
// Requests

function userMessage(attachments, text) {
  const parts = attachments.map((a) => a.kind === "image"
    ? { type: "image_url", image_url: { url: a.url } } : { type: "video_url", video_url: { url: a.url } });
  return { role: "user", content: [...parts, { type: "text", text }] };
}

function pending(attachments, text) { return [...state.history, userMessage(attachments, text)]; }

function number(id) { const v = $(id).valueAsNumber; return Number.isFinite(v) ? v : undefined; }

function request(messages) {
  return { model: config.model, messages, stream: true, stream_options: { include_usage: true },
           temperature: number("temperature"), max_tokens: number("max-tokens"), max_pixels: number("max-pixels") };
}

async function send() {
  const text = $("prompt").value.trim();
  if (state.controller || (!text && !state.attachments.length)) return;
  const messages = pending(state.attachments, text);
  const why = refusal(messages);
  if (why) { notice(why); return; }
  notice("");
  const images = [...imagesOf(state.history), ...state.attachments.filter((a) => a.kind === "image").map((a) => a.url)];
  showUser(state.attachments, text);
  $("prompt").value = "";
  state.attachments = [];
  showAttachments();
  const view = showAssistant();
  state.controller = new AbortController();
  busy(true);
  const t0 = performance.now();
  let answer = "", first = null, usage = null, finish = null;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: { "Content-Type": "application/json" },
                                                    body: JSON.stringify(request(messages)),
                                                    signal: state.controller.signal });
    if (!r.ok) throw new Error(await errorText(r));
    for await (const event of events(r.body)) {
      if (event.error) throw new Error(event.error.message || "the server failed");
      if (event.usage) usage = event.usage;
      const choice = event.choices?.[0];
      if (choice?.delta?.content) {
        first ??= performance.now();
        answer += choice.delta.content;
        renderAnswer(view.text, answer, images);
      }
      if (choice?.finish_reason) finish = choice.finish_reason;
    }
    state.history = [...messages, { role: "assistant", content: answer }];
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
      state.history = [...messages, { role: "assistant", content: answer }];
    } else {
      view.root.classList.add("error");
      view.text.textContent = `Error: ${e.message}`;
    }
  } finally {
    state.controller = null;
    busy(false);
  }
  if (!view.root.classList.contains("error")) {
    renderAnswer(view.text, answer, images);
    view.stats.textContent = stats(t0, first, usage, finish);
  }
  view.root.dataset.done = finish || "error";
}

async function errorText(r) {
  try { return (await r.json()).error?.message || `HTTP ${r.status}`; } catch { return `HTTP ${r.status}`; }
}

async function* events(stream) {  // server-sent events: one JSON object per "data:" line, until [DONE]
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function stats(t0, first, usage, finish) {
  const parts = [];
  if (first) parts.push(`first token ${((first - t0) / 1000).toFixed(2)} s`);
  if (usage && first && usage.completion_tokens > 1) {
    const seconds = (performance.now() - first) / 1000;
    parts.push(`${((usage.completion_tokens - 1) / Math.max(seconds, 1e-3)).toFixed(1)} tokens/s`);
  }
  if (usage) {
    const media = (usage.image_tokens || 0) + (usage.video_tokens || 0);
    parts.push(`${usage.prompt_tokens} prompt tokens` + (media ? ` (${media} image/video)` : ""));
    const cached = usage.prompt_tokens_details?.cached_tokens;
    if (cached !== undefined) parts.push(`${cached} cached`);
  }
  if (finish) parts.push(finish === "length" ? "stopped at max tokens" : finish === "stopped" ? "stopped" : "done");
  return parts.join(" · ");
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
$("stop").addEventListener("click", () => state.controller?.abort());
$("new-chat").addEventListener("click", () => {
  state.controller?.abort();
  state.history = [];
  $("conversation").replaceChildren();
  notice("");
  $("prompt").focus();
});

// ----------------------------------------------------------------------------------------------------------------
// The conversation: markdown rendered safely, grounding boxes drawn on the image they refer to

function imagesOf(messages) {
  return messages.flatMap((m) => Array.isArray(m.content)
    ? m.content.filter((p) => p.type === "image_url").map((p) => p.image_url.url) : []);
}

function element(tag, className, parent) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  parent?.append(el);
  return el;
}

function showUser(attachments, text) {
  const root = element("div", "message user", $("conversation"));
  const thumbs = element("div", "thumbs", root);
  for (const a of attachments) {
    const media = element(a.kind === "image" ? "img" : "video", null, thumbs);
    media.src = a.url;
    if (a.kind === "image") media.alt = a.name;
  }
  element("div", "text", root).textContent = text;
  root.scrollIntoView({ block: "end" });
}

function showAssistant() {
  const root = element("div", "message assistant", $("conversation"));
  const view = { root, text: element("div", "text", root), stats: element("div", "stats", root) };
  root.scrollIntoView({ block: "end" });
  return view;
}

// Boxes are [0, 1000) of the image (Qwen2-VL's convention) and belong to the last image of the conversation.
function renderAnswer(el, text, images) {
  const boxes = [];
  const marked_ = text.replace(BOX, (_, label, x1, y1, x2, y2) => {
    boxes.push({ label: (label || "").trim(), x1: +x1, y1: +y1, x2: +x2, y2: +y2 });
    return `QWENREF${boxes.length - 1}Z`;
  }).replace(/<\|(object_ref_start|object_ref_end|box_start|box_end|quad_start|quad_end)\|>/g, "");
  el.innerHTML = DOMPurify.sanitize(marked.parse(marked_));
  const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
  const nodes = [];
  while (walker.nextNode()) nodes.push(walker.currentNode);
  for (const node of nodes) {
    const pieces = node.nodeValue.split(/QWENREF(\d+)Z/);
    if (pieces.length === 1) continue;
    const frag = document.createDocumentFragment();
    pieces.forEach((piece, i) => {
      if (i % 2 === 0) { frag.append(piece); return; }
      const span = element("span", "ref");
      span.dataset.box = piece;
      span.textContent = boxes[+piece].label || `box ${+piece + 1}`;
      span.tabIndex = 0;
      frag.append(span);
    });
    node.replaceWith(frag);
  }
  if (boxes.length && images.length) drawBoxes(el, boxes, images.at(-1));
}

function drawBoxes(el, boxes, url) {
  const figure = element("figure", null, el);
  const canvas = element("canvas", null, figure);
  canvas.setAttribute("aria-label", `the image with ${boxes.length} box(es)`);
  const img = new Image();
  const draw = (active) => {
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    const scale = Math.max(2, canvas.width / 300);
    boxes.forEach((b, i) => {
      const [x, y] = [b.x1 / 1000 * canvas.width, b.y1 / 1000 * canvas.height];
      const [w, h] = [(b.x2 - b.x1) / 1000 * canvas.width, (b.y2 - b.y1) / 1000 * canvas.height];
      ctx.lineWidth = i === active ? 2 * scale : scale;
      ctx.strokeStyle = i === active ? "#ffd43b" : "#ff00ff";
      ctx.strokeRect(x, y, w, h);
      const label = b.label || `box ${i + 1}`;
      ctx.font = `${Math.round(6 * scale)}px system-ui, sans-serif`;
      const tw = ctx.measureText(label).width + 2 * scale;
      ctx.fillStyle = ctx.strokeStyle;
      ctx.fillRect(x, Math.max(0, y - 8 * scale), tw, 8 * scale);
      ctx.fillStyle = "#000";
      ctx.fillText(label, x + scale, Math.max(6 * scale, y - 2 * scale));
    });
    canvas.dataset.drawn = String(active ?? "none");
  };
  img.onload = () => {
    const fit = Math.min(1, 640 / img.naturalWidth);
    canvas.width = Math.round(img.naturalWidth * fit);
    canvas.height = Math.round(img.naturalHeight * fit);
    draw(null);
  };
  img.src = url;
  for (const span of el.querySelectorAll(".ref")) {
    const on = () => { span.classList.add("active"); draw(+span.dataset.box); };
    const off = () => { span.classList.remove("active"); draw(null); };
    span.addEventListener("mouseenter", on);
    span.addEventListener("focus", on);
    span.addEventListener("mouseleave", off);
    span.addEventListener("blur", off);
  }
}

// ----------------------------------------------------------------------------------------------------------------

$("model-name").textContent = config.model;
$("max-pixels").value = config.max_pixels;
$("limits").textContent = `Up to ${config.max_images} images and ${config.max_videos} videos per message; ` +
  `at most ${(config.max_body_bytes / 1048576).toFixed(1)} MB per request; images are scaled to at most ` +
  `${config.max_pixels} pixels.`;
window.qwen2vl = { renderAnswer, showAssistant };  // for tests: render a crafted answer as the page would
