// edgedeploy dashboard: live regions over server-sent events, relative times, log tail, confirmations.
// Hand-written, no dependency. Server HTML arrives escaped by the templates; anything a device wrote
// that this script puts in the page goes in through textContent, never innerHTML.
"use strict";

(function () {
  const main = document.getElementById("main");
  const live = document.getElementById("live");

  function ago(iso) {
    const s = (Date.now() - Date.parse(iso)) / 1000;
    if (!isFinite(s)) return iso;
    if (s < 1) return "just now";
    for (const [unit, size] of [["d", 86400], ["h", 3600], ["min", 60]]) {
      if (s >= size) return Math.floor(s / size) + " " + unit + " ago";
    }
    return Math.floor(s) + " s ago";
  }

  function relativeTimes(root) {
    for (const t of root.querySelectorAll("time[datetime]")) {
      const iso = t.getAttribute("datetime");
      t.title = iso;
      t.textContent = ago(iso);
    }
  }

  function setLive(state) {
    if (live) live.dataset.state = state;
  }

  // A fragment replaces the element with the same id. The HTML was rendered by the server's
  // autoescaped templates; a <template> keeps it inert until it is in place.
  function applyFragment(data) {
    const target = document.getElementById(data.id);
    if (!target) return;
    const tpl = document.createElement("template");
    tpl.innerHTML = data.html;
    const node = tpl.content.firstElementChild;
    if (!node || node.id !== data.id) return;
    relativeTimes(node);
    target.replaceWith(node);
  }

  function connect() {
    const url = main && main.dataset.events;
    if (!url) return;
    const source = new EventSource(url);
    source.addEventListener("open", () => setLive("on"));
    source.addEventListener("fragment", (e) => {
      try {
        applyFragment(JSON.parse(e.data));
        setLive("on");
      } catch (err) {
        console.error("dashboard: bad fragment", err);
      }
    });
    source.addEventListener("gone", (e) => {
      source.close();
      setLive("off");
      const note = document.createElement("p");
      note.className = "flash bad";
      note.textContent = JSON.parse(e.data).error;
      main.prepend(note);
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        setLive("off");
        fetch(url, { method: "GET", credentials: "same-origin" }).then((r) => {
          if (r.status === 401) window.location.assign("/ui/login");
          else setTimeout(connect, 5000);
          if (r.body) r.body.cancel();
        }, () => setTimeout(connect, 5000));
      } else {
        setLive("reconnecting");
      }
    });
  }

  // Forms that change something ask first (data-confirm) and always carry the session's CSRF token.
  document.addEventListener("submit", (e) => {
    const form = e.target;
    const question = form.dataset.confirm;
    if (question && !window.confirm(question)) {
      e.preventDefault();
      return;
    }
    const csrf = form.querySelector("input[name=csrf]");
    if (csrf && !csrf.value && main) csrf.value = main.dataset.csrf;
  });

  // Log tail: asks the device (over the command topics) every 2 s while "follow" is on.
  let tail = null;
  function stopTail() {
    if (tail) clearTimeout(tail.timer);
    tail = null;
  }
  async function pollLogs(device, module) {
    const status = document.getElementById("log-status");
    const lines = document.getElementById("log-lines");
    const url = "/ui/devices/" + encodeURIComponent(device) + "/modules/" + encodeURIComponent(module) + "/logs?tail=200";
    try {
      const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      const body = await r.json();
      if (!tail || tail.module !== module) return;
      if (body.ok) {
        lines.textContent = body.lines.join("\n");
        status.textContent = body.lines.length + " lines at " + new Date().toLocaleTimeString();
      } else {
        status.textContent = body.error;
      }
    } catch (err) {
      status.textContent = "could not fetch the log: " + err;
    }
    const follow = document.getElementById("log-follow");
    if (tail && tail.module === module && follow && follow.checked) {
      tail.timer = setTimeout(() => pollLogs(device, module), 2000);
    }
  }
  document.addEventListener("click", (e) => {
    const button = e.target.closest && e.target.closest("button.show-logs");
    if (button) {
      stopTail();
      const section = document.getElementById("logs");
      section.hidden = false;
      document.getElementById("log-module").textContent = button.dataset.module;
      document.getElementById("log-lines").textContent = "";
      document.getElementById("log-status").textContent = "asking the device…";
      tail = { module: button.dataset.module, timer: null };
      pollLogs(button.dataset.device, button.dataset.module);
      return;
    }
    if (e.target.id === "log-close") {
      stopTail();
      document.getElementById("logs").hidden = true;
    }
  });
  document.addEventListener("change", (e) => {
    if (e.target.id === "log-follow" && e.target.checked && tail) {
      const button = document.querySelector("button.show-logs[data-module='" + CSS.escape(tail.module) + "']");
      if (button) pollLogs(button.dataset.device, tail.module);
    }
  });

  relativeTimes(document);
  setInterval(() => relativeTimes(document), 5000);
  connect();
})();
