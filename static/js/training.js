// The training page's charts by step: loss; what each algorithm moves (reward accuracy and margin
// for DPO and reward models, KL for GRPO, the reward model's score and KL for PPO and online GRPO);
// and for those two, response length and PPO's value loss.
// The metrics come from the live panel's `data-metrics` attribute (JSON); htmx swaps the panel
// every two seconds while the run goes, and the charts are updated in place.
(function () {
  "use strict";

  const ACCURACY = {
    axis: "accuracy",
    bounded: true,
    right: "margin",
    series: [
      { key: "rewards/accuracies", label: "reward accuracy", color: "#067647" },
      { key: "rewards/margins", label: "reward margin", color: "#7a5af8", axis: "y1" },
    ],
  };
  const ONLINE = {
    axis: "reward",
    right: "KL",
    series: [
      { key: "reward", label: "reward model score", color: "#067647" },
      { key: "kl", label: "KL to the reference", color: "#b54708", axis: "y1" },
    ],
  };
  const QUALITY = {
    dpo: ACCURACY,
    grpo: { axis: "KL", series: [{ key: "kl", label: "KL to the reference", color: "#b54708" }] },
    reward: {
      ...ACCURACY,
      series: [
        { key: "accuracy", label: "pair accuracy", color: "#067647" },
        { key: "rewards/margins", label: "reward margin", color: "#7a5af8", axis: "y1" },
      ],
    },
    grpo_online: ONLINE,
    ppo: ONLINE,
  };
  const CHARTS = {
    loss: () => ({ axis: "loss", series: [{ key: "loss", label: "loss", color: "#2f5bd3" }] }),
    quality: (algorithm) => QUALITY[algorithm] || ACCURACY,
    rollout: () => ({
      axis: "tokens",
      right: "value loss",
      series: [
        { key: "response_length", label: "response length", color: "#2f5bd3" },
        { key: "value_loss", label: "value loss", color: "#b54708", axis: "y1" },
      ],
    }),
  };

  function readMetrics() {
    const panel = document.getElementById("run-live");
    return panel && panel.dataset.metrics ? JSON.parse(panel.dataset.metrics) : null;
  }

  function datasets(kind, run) {
    return CHARTS[kind](run.algorithm).series.map((series) => ({
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
    const chart = CHARTS[kind](run.algorithm);
    const scales = {
      x: { type: "linear", title: { display: true, text: "step" }, ticks: { precision: 0 } },
      y: { title: { display: true, text: chart.axis } },
    };
    if (chart.bounded) {
      scales.y.min = 0;
      scales.y.max = 1;
    }
    if (chart.right) {
      scales.y1 = { position: "right", title: { display: true, text: chart.right }, grid: { drawOnChartArea: false } };
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
