// The try-it page: sends the chosen photo to POST v1.0/removebg and shows what comes back.
// No build step, no third-party code, no inline script (the page runs under a strict CSP).
// The photo, the result and the API key stay in this tab's memory: nothing is stored anywhere.
"use strict";

(function () {
  // Relative, so the page also works behind a proxy that serves the gateway under a path prefix.
  const ENDPOINT = "v1.0/removebg";
  const EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "application/zip": "zip",
  };

  const $ = (id) => document.getElementById(id);
  const form = $("form");
  const fileInput = $("file");
  const dropzone = $("dropzone");
  const useBg = $("use-bg");
  const bgColor = $("bg-color");
  const submit = $("submit");
  const status = $("status");
  const errorBox = $("error");
  const results = $("results");
  const original = $("original");
  const result = $("result");
  const resultNote = $("result-note");
  const resultCaption = $("result-caption");
  const downloadRow = $("download-row");
  const download = $("download");
  const resultInfo = $("result-info");

  let chosen = null; // the File picked or dropped
  let originalUrl = null;
  let resultUrl = null;
  let inFlight = null; // AbortController of the running request

  function setStatus(state, text) {
    status.dataset.state = state;
    status.textContent = text;
  }

  function revoke(url) {
    if (url) URL.revokeObjectURL(url);
  }

  // "<stem>-cutout.<ext>", built here from the local file name: the name is never sent to the server.
  function downloadName(fileName, ext) {
    const dot = fileName.lastIndexOf(".");
    let stem = dot > 0 ? fileName.slice(0, dot) : fileName;
    stem = stem.replace(/[\u0000-\u001f\u007f/\\:*?"<>|]+/g, "_").trim().slice(0, 100);
    return (stem || "image") + "-cutout." + ext;
  }

  function showError(title, detail, meta) {
    $("error-title").textContent = title;
    $("error-detail").textContent = detail || "";
    $("error-meta").textContent = meta || "";
    errorBox.hidden = false;
    results.hidden = true;
    // The alert announces the reason; the status line only says that it failed.
    setStatus("error", "Failed.");
  }

  function clearResult() {
    errorBox.hidden = true;
    revoke(resultUrl);
    resultUrl = null;
    result.hidden = true;
    result.removeAttribute("src");
    resultNote.hidden = true;
    downloadRow.hidden = true;
    download.setAttribute("href", "#");
  }

  // remove.bg's error shape: {"errors": [{"title", "code", "detail"}]}; anything else is shown by status.
  async function reportHttpError(resp) {
    let title = resp.status + " " + (resp.statusText || "error");
    let detail = "";
    let code = "";
    try {
      const body = await resp.json();
      const first = body && Array.isArray(body.errors) ? body.errors[0] : null;
      if (first) {
        title = first.title || title;
        detail = first.detail || "";
        code = first.code || "";
      }
    } catch (_) {
      // Not JSON (a proxy's page, say): the status line is all there is.
    }
    const meta = ["HTTP " + resp.status];
    if (code) meta.push("code " + code);
    const retry = resp.headers.get("Retry-After");
    if (retry) meta.push("retry after " + retry + " s");
    showError(title, detail, meta.join(" · "));
  }

  function formData() {
    const data = new FormData();
    data.append("image_file", chosen, "image");
    data.append("format", $("format").value);
    data.append("channels", $("channels").value);
    data.append("size", $("size").value);
    if ($("crop").checked) data.append("crop", "true");
    if (useBg.checked) data.append("bg_color", bgColor.value.replace("#", ""));
    return data;
  }

  async function run() {
    if (!chosen) {
      setStatus("error", "Pick a photo first.");
      fileInput.focus();
      return;
    }
    if (inFlight) inFlight.abort();
    const controller = new AbortController();
    inFlight = controller;
    clearResult();
    results.hidden = false;
    results.setAttribute("aria-busy", "true");
    submit.disabled = true;
    setStatus("busy", "Removing the background…");

    // No Accept header: remove.bg answers JSON only to Accept: application/json, and the page wants bytes.
    const headers = {};
    const key = $("api-key").value.trim();
    if (key) headers["X-Api-Key"] = key;

    let resp;
    try {
      resp = await fetch(ENDPOINT, {
        method: "POST",
        body: formData(),
        headers: headers,
        signal: controller.signal,
        cache: "no-store",
        credentials: "omit",
      });
      if (!resp.ok) {
        await reportHttpError(resp);
        return;
      }
      const blob = await resp.blob();
      const type = (resp.headers.get("Content-Type") || blob.type).split(";")[0].trim();
      const ext = EXTENSIONS[type] || $("format").value;
      resultUrl = URL.createObjectURL(blob);
      const name = downloadName(chosen.name || "image", ext);
      download.href = resultUrl;
      download.download = name;
      download.textContent = "Download " + name;
      const w = resp.headers.get("X-Width");
      const h = resp.headers.get("X-Height");
      const size = w && h ? w + " × " + h + " px, " : "";
      resultInfo.textContent = size + Math.max(1, Math.round(blob.size / 1024)) + " KiB, " + type;
      if (ext === "zip") {
        resultCaption.textContent = "Cut-out (ZIP)";
        resultNote.textContent = "A ZIP (colour JPG + alpha PNG) cannot be previewed: download it.";
        resultNote.hidden = false;
      } else {
        resultCaption.textContent = "Cut-out";
        result.src = resultUrl;
        result.hidden = false;
      }
      downloadRow.hidden = false;
      setStatus("done", "Done: " + size + "ready to download.");
    } catch (err) {
      if (err && err.name === "AbortError") return;
      showError("Could not reach the service", String(err && err.message ? err.message : err), "");
    } finally {
      if (inFlight === controller) {
        inFlight = null;
        submit.disabled = false;
        results.setAttribute("aria-busy", "false");
      }
    }
  }

  function choose(file) {
    if (!file) return;
    chosen = file;
    revoke(originalUrl);
    originalUrl = URL.createObjectURL(file);
    original.src = originalUrl;
    original.alt = "Your original photo";
    run();
  }

  fileInput.addEventListener("change", () => choose(fileInput.files && fileInput.files[0]));

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });

  useBg.addEventListener("change", () => {
    bgColor.disabled = !useBg.checked;
  });

  ["dragenter", "dragover"].forEach((name) =>
    dropzone.addEventListener(name, (event) => {
      event.preventDefault();
      dropzone.classList.add("dragging");
    }),
  );
  ["dragleave", "drop"].forEach((name) =>
    dropzone.addEventListener(name, () => dropzone.classList.remove("dragging")),
  );
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    const files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length) choose(files[0]);
  });
  // A photo dropped outside the zone must not make the browser navigate away to it.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  setStatus("idle", "Pick a photo to start.");
})();
