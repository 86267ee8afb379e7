// The training page's charts: loss, and reward accuracy (DPO) or KL (GRPO), by step.
// The metrics come from the live panel's `data-metrics` attribute (JSON); htmx swaps the panel
// every two seconds while the run goes, and the charts are updated in place.
(function () {
  "use strict";

  const SERIES = {
    loss: () => [{ key: "loss", label: "loss", color: "#2f5bd3" }],
    quality: (algorithm) =>
      algorithm === "grpo"
        ? [{ key: "kl", label: "KL to the reference", color: "#b54708" }]
        : [
            { key: "rewards/accuracies", label: "reward accuracy", color: "#067647" },
            { key: "rewards/margins", label: "reward margin", color: "#7a5af8", axis: "y1" },
          ],
  };

  function readMetrics() {
    const panel = document.getElementById("run-live");
    return panel && panel.dataset.metrics ? JSON.parse(panel.dataset.metrics) : null;
  }

  function datasets(kind, run) {
    return SERIES[kind](run.algorithm).map((series) => ({
      label: series.label,
      data: run.metrics
        .filter((point) => typeof point[series.key] === "number")
        .map((point) => ({ x: point.step, y: point[series.key] })),
      borderColor: series.color,
      backgroundColor: series.color,
      pointRadius: run.metrics.length > 40 ? 0 : 2,
      borderWidth: 2,
      yAxisID: series.axis || "y",
    }));
  }

  function options(kind, run) {
    const scales = {
      x: { type: "linear", title: { display: true, text: "step" }, ticks: { precision: 0 } },
      y: { title: { display: true, text: kind === "loss" ? "loss" : run.algorithm === "grpo" ? "KL" : "accuracy" } },
    };
    if (kind === "quality" && run.algorithm !== "grpo") {
      scales.y.min = 0;
      scales.y.max = 1;
      scales.y1 = { position: "right", title: { display: true, text: "margin" }, grid: { drawOnChartArea: false } };
    }
    return { animation: false, maintainAspectRatio: false, parsing: false, scales, plugins: { legend: { position: "bottom" } } };
  }

  function draw() {
    if (typeof window.Chart === "undefined") return;
    const run = readMetrics();
    if (!run) return;
    document.querySelectorAll("canvas[data-chart]").forEach((canvas) => {
      const kind = canvas.dataset.chart;
      const chart = window.Chart.getChart(canvas);
      if (chart) {
        chart.data.datasets = datasets(kind, run);
        chart.update("none");
      } else {
        new window.Chart(canvas, { type: "line", data: { datasets: datasets(kind, run) }, options: options(kind, run) });
      }
    });
  }

  // htmx:load fires for the page and for every piece of content htmx swaps in (including a
  // polled panel that replaced itself, whose own swap events are fired on the detached element).
  let pending = false;
  document.addEventListener("DOMContentLoaded", draw);
  document.addEventListener("htmx:load", () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      draw();
    });
  });
})();
