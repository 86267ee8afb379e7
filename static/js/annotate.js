// The annotate page: keyboard shortcuts, drag-and-drop and keyboard ranking with ties,
// time on task, and showing the prefetched task the moment a task is submitted or skipped.
// The page works without this script: every form posts and the server redirects.
(function () {
  "use strict";

  document.documentElement.classList.add("js");

  const config = JSON.parse(document.getElementById("annotate-config").textContent);
  const current = document.getElementById("current");
  const prefetch = document.getElementById("prefetch");
  const outbox = document.getElementById("outbox");
  const notice = document.getElementById("notice");
  const help = document.getElementById("help");
  const shownAt = new WeakMap();

  function currentForm() {
    return current.querySelector("form.task");
  }

  function prefetchedForm() {
    return prefetch.querySelector("form.task");
  }

  // --- ranking: an ordered list of groups; tied completions share a group and a rank ---

  const rankings = new WeakMap();

  function setUpRanking(form) {
    const list = form.querySelector("[data-ranking]");
    if (!list || rankings.has(form)) return;
    const state = { list: list, groups: Array.from(list.children).map(function (li) { return [li]; }) };
    rankings.set(form, state);
    render(state);
    if (window.Sortable) {
      window.Sortable.create(list, {
        animation: 120,
        draggable: ".rank-item",
        filter: "select, a",
        preventOnFilter: false,
        onEnd: function (event) { dropped(state, event.item); },
      });
    }
  }

  function groupIndex(state, li) {
    return state.groups.findIndex(function (group) { return group.indexOf(li) !== -1; });
  }

  function takeOut(state, li) {
    const index = groupIndex(state, li);
    const group = state.groups[index];
    group.splice(group.indexOf(li), 1);
    if (group.length === 0) state.groups.splice(index, 1);
    return group.length === 0 ? index : index + 1; // where a new group takes this one's place
  }

  function render(state) {
    state.groups.forEach(function (group, index) {
      group.forEach(function (li, place) {
        state.list.appendChild(li);
        li.classList.toggle("tied", group.length > 1);
        li.classList.toggle("tied-with-previous", place > 0);
        li.querySelector(".rank-badge").textContent = String(index + 1) + (group.length > 1 ? "=" : "");
        li.querySelector("select").value = String(index + 1);
        li.setAttribute(
          "aria-label",
          "Rank " + (index + 1) + (group.length > 1 ? ", tied with " + (group.length - 1) + " other" + (group.length > 2 ? "s" : "") : "")
        );
      });
    });
  }

  function dropped(state, li) {
    const previous = li.previousElementSibling;
    const next = li.nextElementSibling;
    takeOut(state, li);
    if (previous && next && groupIndex(state, previous) === groupIndex(state, next)) {
      // dropped inside a tie: join it
      const group = state.groups[groupIndex(state, previous)];
      group.splice(group.indexOf(previous) + 1, 0, li);
    } else {
      const at = previous ? groupIndex(state, previous) + 1 : 0;
      state.groups.splice(at, 0, [li]);
    }
    render(state);
    li.focus();
  }

  function moveUp(state, li) {
    const index = groupIndex(state, li);
    if (state.groups[index].length > 1) {
      takeOut(state, li);
      state.groups.splice(index, 0, [li]); // out of the tie, just above it
    } else if (index > 0) {
      state.groups.splice(index, 1);
      state.groups.splice(index - 1, 0, [li]);
    }
    render(state);
    li.focus();
  }

  function moveDown(state, li) {
    const index = groupIndex(state, li);
    if (state.groups[index].length > 1) {
      takeOut(state, li);
      state.groups.splice(index + 1, 0, [li]); // out of the tie, just below it
    } else if (index < state.groups.length - 1) {
      state.groups.splice(index, 1);
      state.groups.splice(index + 1, 0, [li]);
    }
    render(state);
    li.focus();
  }

  function tie(state, li) {
    const index = groupIndex(state, li);
    const neighbour = index > 0 ? index - 1 : index + 1;
    const target = state.groups[neighbour];
    if (!target) return;
    takeOut(state, li);
    if (neighbour < index) target.push(li);
    else target.unshift(li);
    render(state);
    li.focus();
  }

  function untie(state, li) {
    const index = groupIndex(state, li);
    if (state.groups[index].length < 2) return;
    takeOut(state, li);
    state.groups.splice(index + 1, 0, [li]);
    render(state);
    li.focus();
  }

  // --- showing tasks ---

  function show(form) {
    current.replaceChildren(form);
    shownAt.set(form, performance.now());
    setUpRanking(form);
    const first = form.querySelector(".rank-item, input[name=choice]");
    if (first && first.classList.contains("rank-item")) first.focus({ preventScroll: true });
    else document.activeElement && document.activeElement.blur && document.activeElement.blur();
    window.scrollTo({ top: 0 });
  }

  function showTemplate(id) {
    current.replaceChildren(document.getElementById(id).content.cloneNode(true));
    window.htmx.process(current); // the "being written" card polls for new tasks
  }

  function promote() {
    const next = prefetchedForm();
    if (next) show(next);
    else showTemplate("loading-template");
    return next;
  }

  function fetchPrefetch() {
    const form = currentForm();
    const shown = form ? "?shown=" + encodeURIComponent(form.dataset.taskId) : "";
    window.htmx.ajax("GET", config.nextUrl + shown, { target: "#prefetch", swap: "innerHTML" });
  }

  function bump(id, by) {
    const el = document.getElementById(id);
    el.textContent = String(Math.max(0, parseInt(el.textContent, 10) + by));
  }

  document.body.addEventListener("htmx:configRequest", function (event) {
    const form = event.detail.elt.closest("form.task");
    if (!form || !current.contains(form)) return;
    const started = shownAt.get(form);
    if (started !== undefined) {
      event.detail.parameters.time_ms = String(Math.round(performance.now() - started));
    }
    const next = prefetchedForm();
    if (next) event.detail.parameters.shown = next.dataset.taskId;
    notice.replaceChildren();
    outbox.appendChild(form); // stays in the document until its response has arrived
    promote();
  });

  document.body.addEventListener("htmx:afterRequest", function (event) {
    const form = event.detail.elt.closest && event.detail.elt.closest("form.task");
    if (form && outbox.contains(form)) form.remove();
  });

  document.body.addEventListener("htmx:afterSwap", function (event) {
    if (event.detail.target !== prefetch) return;
    const next = prefetchedForm();
    const shown = currentForm();
    if (next && shown && next.dataset.taskId === shown.dataset.taskId) {
      prefetch.replaceChildren();
      fetchPrefetch();
    } else if (!shown) {
      if (next) show(next);
      else showTemplate("all-done-template");
    }
  });

  document.body.addEventListener("rankwise:judged", function () {
    bump("count-mine", 1);
    bump("count-total", 1);
    bump("count-left", -1);
  });

  function failed(event) {
    const form = event.detail.elt.closest && event.detail.elt.closest("form.task");
    if (!form || !outbox.contains(form)) return;
    const box = document.createElement("div");
    box.className = "notice error";
    const text = document.createElement("p");
    const status = event.detail.xhr && event.detail.xhr.status;
    text.textContent =
      "Your last answer was not saved (" +
      (status ? "the server answered " + status : "no connection") +
      "). Reload the page to continue; if you were logged out, log in again.";
    box.appendChild(text);
    notice.replaceChildren(box);
  }

  document.body.addEventListener("htmx:responseError", failed);
  document.body.addEventListener("htmx:sendError", failed);

  document.body.addEventListener("rankwise:rejected", function () {
    if (!prefetchedForm()) fetchPrefetch();
  });

  // --- keyboard ---

  function typing(target) {
    return target.matches && target.matches("textarea, input[type=text], select");
  }

  function toggleHelp() {
    if (help.open) help.close();
    else help.showModal();
  }

  document.getElementById("help-open").addEventListener("click", toggleHelp);
  document.getElementById("help-close").addEventListener("click", function () { help.close(); });

  function choose(form, name, value) {
    const input = form.querySelector("input[name=" + name + "][value=" + value + "]");
    if (!input) return;
    if (name === "strength" && input.checked) input.checked = false;
    else input.checked = true;
  }

  function submit(form) {
    const choice = form.querySelector("input[name=choice]");
    if (choice && !form.querySelector("input[name=choice]:checked")) {
      choice.reportValidity();
      return;
    }
    form.requestSubmit(form.querySelector("[data-action=submit]"));
  }

  const pairwiseKeys = { "1": ["choice", "a"], "2": ["choice", "b"], "3": ["choice", "tie"], "4": ["choice", "both_bad"], s: ["strength", "slight"], c: ["strength", "clear"] };

  document.addEventListener("keydown", function (event) {
    if (event.key === "?" && !typing(event.target)) {
      event.preventDefault();
      toggleHelp();
      return;
    }
    if (help.open) return; // the dialog handles Esc itself
    const form = currentForm();
    if (!form) return;
    if (typing(event.target)) {
      if (event.key === "Escape") event.target.blur();
      else if (event.key === "Enter" && event.target.name === "reason") {
        event.preventDefault(); // Enter in the skip reason skips, it does not submit a judgement
        form.querySelector("[data-action=skip]").click();
      } else if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        submit(form);
      }
      return;
    }
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
    const state = rankings.get(form);
    const item = event.target.closest && event.target.closest(".rank-item");
    let handled = true;
    if (key === "Enter" && !(event.target.matches && event.target.matches("button, a, summary"))) submit(form);
    else if (key === "k") form.querySelector("[data-action=skip]").click();
    else if (key === "r") form.querySelector("[data-rationale]").focus();
    else if (key === "g") {
      const guidelines = document.getElementById("guidelines");
      if (guidelines) guidelines.open = !guidelines.open;
    } else if (!state && pairwiseKeys[key]) choose(form, pairwiseKeys[key][0], pairwiseKeys[key][1]);
    else if (state && (key === "ArrowUp" || key === "ArrowDown")) {
      if (!item || !form.contains(item)) {
        form.querySelector(".rank-item").focus();
      } else if (event.shiftKey) {
        (key === "ArrowUp" ? moveUp : moveDown)(state, item);
      } else {
        const sibling = key === "ArrowUp" ? item.previousElementSibling : item.nextElementSibling;
        if (sibling) sibling.focus();
      }
    } else if (state && item && key === "t") tie(state, item);
    else if (state && item && key === "u") untie(state, item);
    else handled = false;
    if (handled) event.preventDefault();
  });

  // --- start ---

  const first = currentForm();
  if (first) show(first);
  document.addEventListener("htmx:load", function (event) {
    const form = event.detail.elt.querySelector && event.detail.elt.querySelector("form.task");
    if (form && current.contains(form)) setUpRanking(form);
  });
})();
