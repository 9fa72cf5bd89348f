// The drawing page: pointer events (mouse, pen and touch alike) draw dark ink on white; when a
// stroke ends the canvas goes to POST /predict as a PNG, and the answer fills the bars, the
// 28x28 previews and, for a number, the boxes of its digits over the pad. The server does all
// the preprocessing and the cutting into digits, the same as `digits predict`. Under each
// answer, a row of buttons sends a correction (POST /feedback) for it: "that was a 7", "that
// is not a digit", for a number one digit at a time.
"use strict";

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const seenCanvas = document.getElementById("seen");
const seen = seenCanvas.getContext("2d");
const boxes = document.getElementById("boxes").getContext("2d");
let placed = { scale: 1, dx: 0, dy: 0 }; // how the last picture sent sits on the pad
const digitEl = document.getElementById("digit");
const confidenceEl = document.getElementById("confidence");
const statusEl = document.getElementById("status");
const upload = document.getElementById("upload");
const INK_WIDTH = 20; // in canvas pixels (280 wide): about MNIST's stroke once scaled to 20 px
let requestId = 0; // numbers the requests: only the latest one's answer is shown

// ten rows: label, bar, value
const bars = [];
for (let d = 0; d < 10; d++) {
  const li = document.createElement("li");
  li.innerHTML = `<span class="label">${d}</span><span class="track"><span class="bar"></span></span><span class="value">–</span>`;
  document.getElementById("bars").appendChild(li);
  bars.push({ li, bar: li.querySelector(".bar"), value: li.querySelector(".value") });
}

// --- corrections ---------------------------------------------------------------------------
const correctEl = document.getElementById("correct");
const pieceEl = document.getElementById("piece");
const thanksEl = document.getElementById("thanks");
let answered = null; // the answer shown: { id, pieces }

for (const label of ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "not a digit"]) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = label;
  button.dataset.label = label;
  button.addEventListener("click", () => correct(label));
  document.getElementById("labels").appendChild(button);
}

function offerCorrection(data) {
  answered = { id: data.prediction_id, pieces: data.digits.length };
  thanksEl.textContent = "";
  thanksEl.dataset.state = "idle";
  thanksEl.classList.remove("error");
  pieceEl.replaceChildren();
  pieceEl.hidden = answered.pieces < 2;
  data.digits.forEach((d, i) => pieceEl.add(new Option(`digit ${i + 1} (${d.digit === null ? "?" : d.digit})`, String(i))));
  correctEl.dataset.predictionId = answered.id || "";
  correctEl.hidden = !answered.id;
}

async function correct(label) {
  if (!answered) return;
  const piece = answered.pieces > 1 ? Number(pieceEl.value) : 0;
  const body = JSON.stringify({ prediction_id: answered.id, label: /^\d$/.test(label) ? Number(label) : label, piece });
  thanksEl.dataset.state = "pending";
  let response, data;
  try {
    response = await fetch("feedback", { method: "POST", headers: { "Content-Type": "application/json" }, body });
    data = await response.json().catch(() => ({}));
  } catch (err) {
    response = null;
    data = { detail: `the server did not answer (${err.message})` };
  }
  const ok = response && response.ok;
  thanksEl.classList.toggle("error", !ok);
  thanksEl.textContent = ok
    ? `Thanks: recorded that ${answered.pieces > 1 ? `digit ${piece + 1}` : "it"} ${label === "not a digit" ? "is not a digit" : `is a ${label}`}.`
    : `Not recorded: ${data.detail || `HTTP ${response.status}`}`;
  thanksEl.dataset.state = ok ? "sent" : "error";
}

function setStatus(text, isError = false) {
  statusEl.textContent = text;
  statusEl.classList.toggle("error", isError);
}

function clearPad() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
}

function resetAnswer() {
  answered = null;
  correctEl.hidden = true;
  digitEl.textContent = "?";
  digitEl.dataset.state = "idle";
  confidenceEl.textContent = "";
  for (const b of bars) {
    b.bar.style.width = "0";
    b.value.textContent = "–";
    b.li.classList.remove("top");
  }
  seen.clearRect(0, 0, seenCanvas.width, seenCanvas.height);
  boxes.clearRect(0, 0, pad.width, pad.height);
}

// --- drawing ---------------------------------------------------------------------------------
let drawing = false;
let last = null;

function canvasPoint(e) {
  // the canvas may be shown smaller than its 280x280 pixels (narrow screens)
  const r = pad.getBoundingClientRect();
  return { x: ((e.clientX - r.left) * pad.width) / r.width, y: ((e.clientY - r.top) * pad.height) / r.height };
}

function segment(a, b) {
  ctx.strokeStyle = "#000";
  ctx.lineWidth = INK_WIDTH;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(a.x, a.y);
  ctx.lineTo(b.x, b.y);
  ctx.stroke();
}

pad.addEventListener("pointerdown", (e) => {
  if (e.pointerType === "mouse" && e.button !== 0) return;
  e.preventDefault();
  pad.setPointerCapture(e.pointerId);
  drawing = true;
  last = canvasPoint(e);
  segment(last, last); // a tap leaves a dot
});

pad.addEventListener("pointermove", (e) => {
  if (!drawing) return;
  // coalesced events: every point the pointer passed, not just one per frame
  const events = (e.getCoalescedEvents && e.getCoalescedEvents()) || [];
  for (const ev of events.length ? events : [e]) {
    const p = canvasPoint(ev);
    segment(last, p);
    last = p;
  }
});

function endStroke() {
  if (!drawing) return;
  drawing = false;
  placed = { scale: 1, dx: 0, dy: 0 }; // the pad itself is sent: its pixels are the picture's
  pad.toBlob((blob) => send(blob, "image/png", "your drawing"), "image/png");
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

document.getElementById("clear").addEventListener("click", () => {
  requestId++; // an answer still on its way is for the old drawing: drop it
  clearPad();
  resetAnswer();
  setStatus("Draw a digit in the box.");
});

// --- upload ----------------------------------------------------------------------------------
upload.addEventListener("change", () => {
  const file = upload.files[0];
  if (!file) return;
  showPicture(file);
  send(file, file.type || "application/octet-stream", file.name);
  upload.value = ""; // choosing the same file again fires `change` again
});

function showPicture(file) {
  // the picture goes on the pad (fitted, centred) so the user sees what was sent
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.onload = () => {
    clearPad();
    const s = Math.min(pad.width / img.width, pad.height / img.height);
    const w = img.width * s, h = img.height * s;
    ctx.drawImage(img, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
    placed = { scale: s, dx: (pad.width - w) / 2, dy: (pad.height - h) / 2 };
    URL.revokeObjectURL(url);
  };
  img.onerror = () => URL.revokeObjectURL(url);
  img.src = url;
}

// --- the model -------------------------------------------------------------------------------
async function send(body, type, what) {
  const id = ++requestId;
  digitEl.dataset.state = "pending";
  setStatus(`Reading ${what}…`);
  let response, data;
  try {
    response = await fetch("predict?images=true", { method: "POST", headers: { "Content-Type": type }, body });
    data = await response.json().catch(() => ({}));
  } catch (err) {
    if (id === requestId) fail(`The server did not answer (${err.message}). Is \`digits app\` still running?`);
    return;
  }
  if (id !== requestId) return; // a newer stroke or upload has been sent since
  if (!response.ok) {
    fail(data.detail || `The server refused it (HTTP ${response.status}).`);
    return;
  }
  show(data, what);
  offerCorrection(data);
  showModel(data.model);
}

function fail(message) {
  resetAnswer();
  digitEl.dataset.state = "error";
  setStatus(message, true);
}

function show(data, what) {
  const pct = (v) => `${(100 * v).toFixed(1)}%`;
  const pieces = data.digits;
  if (pieces.length > 1) return showNumber(data, what, pct);
  // one digit; digit null: not a digit (with a best guess, or none for a blank image)
  const p = data.probabilities || Array(10).fill(0);
  const refused = data.digit === null;
  digitEl.textContent = refused ? "not a digit" : String(data.digit);
  digitEl.dataset.refused = String(refused);
  if (!refused) confidenceEl.textContent = `${pct(data.confidence)} sure`;
  else if (data.guess === null) confidenceEl.textContent = "no ink";
  else confidenceEl.textContent = `best guess ${data.guess}, ${pct(data.confidence)}`;
  fillBars(p, refused ? null : data.digit, pct);
  drawSeen(data.images);
  drawBoxes(pieces);
  done(refused ? `The model says ${what} is not a digit.` : `The model reads ${what} as ${data.digit}.`);
}

function showNumber(data, what, pct) {
  // the number, "?" where a piece is not a digit; the bars are the first digit's
  digitEl.textContent = data.reading;
  digitEl.dataset.refused = String(data.number === null);
  confidenceEl.textContent = data.digits
    .map((d) => (d.digit === null ? `not a digit (best guess ${d.guess}, ${pct(d.confidence)})` : `${d.digit} ${pct(d.confidence)}`))
    .join(", ");
  fillBars(data.digits[0].probabilities, data.digits[0].digit, pct);
  drawSeen(data.images);
  drawBoxes(data.digits);
  done(data.number === null
    ? `The model reads ${what} as ${data.reading}: "?" is not a digit.`
    : `The model reads ${what} as ${data.number}.`);
}

function fillBars(p, top, pct) {
  bars.forEach((b, d) => {
    b.bar.style.width = pct(p[d]);
    b.value.textContent = pct(p[d]);
    b.li.classList.toggle("top", d === top);
  });
}

function showModel(model) {
  if (!model) return;
  document.getElementById("version").textContent = model.version ? `(version ${model.version} answered)` : "";
}

function done(message) {
  digitEl.dataset.state = "done";
  digitEl.dataset.answers = String(Number(digitEl.dataset.answers) + 1);
  setStatus(message);
}

function drawBoxes(pieces) {
  // each digit's box (the picture's pixels), mapped onto the pad as the picture was placed
  boxes.clearRect(0, 0, pad.width, pad.height);
  if (pieces.length < 2) return;
  boxes.lineWidth = 2;
  pieces.forEach((d) => {
    const [top, left, bottom, right] = d.box;
    const s = placed.scale;
    boxes.strokeStyle = d.digit === null ? "#c0392b" : "#2f6fde";
    boxes.strokeRect(placed.dx + left * s - 3, placed.dy + top * s - 3, (right - left) * s + 6, (bottom - top) * s + 6);
    boxes.fillStyle = boxes.strokeStyle;
    boxes.font = "bold 14px system-ui, sans-serif";
    boxes.fillText(d.digit === null ? "?" : String(d.digit), placed.dx + left * s, placed.dy + top * s - 6);
  });
}

function drawSeen(images) {
  // light ink on black, as the model sees it (and as MNIST stores digits), side by side
  const k = Math.max(images.length, 1);
  const shown = Math.min(112 * k, 336); // on screen: 4x a digit, at most three digits' width
  seenCanvas.width = 28 * k;
  seenCanvas.style.width = `${shown}px`;
  seenCanvas.style.height = `${shown / k}px`;
  images.forEach((rows, k) => {
    const pixels = seen.createImageData(28, 28);
    rows.flat().forEach((v, i) => {
      const g = Math.round(255 * v);
      pixels.data.set([g, g, g, 255], 4 * i);
    });
    seen.putImageData(pixels, 28 * k, 0);
  });
}

fetch("health")
  .then((r) => r.json())
  .then((info) => (document.getElementById("model").textContent = info.model))
  .catch(() => {});

clearPad();
resetAnswer();
