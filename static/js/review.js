// The review item page from the keyboard: 1-4 choose A / B / tie / both bad, u unusable,
// n the note, Enter records the verdict. Keys are ignored while typing in a field.
(function () {
  "use strict";

  function typing(target) {
    return target && target.matches && target.matches("input[type=text], textarea, select");
  }

  document.addEventListener("keydown", function (event) {
    const form = document.getElementById("verdict-form");
    if (!form || event.ctrlKey || event.metaKey || event.altKey) return;
    if (typing(event.target)) {
      if (event.key === "Escape") event.target.blur();
      return;
    }
    const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
    const choice = form.querySelector('input[name=verdict][data-key="' + key + '"]');
    if (choice) {
      choice.checked = true;
      choice.focus();
      event.preventDefault();
    } else if (key === "n") {
      form.querySelector("textarea[name=note]").focus();
      event.preventDefault();
    } else if (key === "Enter" && !(event.target.matches && event.target.matches("button, a"))) {
      form.requestSubmit();
      event.preventDefault();
    }
  });
})();
