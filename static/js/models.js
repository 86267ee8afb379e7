// The Models page's chart: each model's Bradley-Terry score with its 95 % bootstrap interval,
// from the leaderboard's figures in the page (json_script "leaderboard-data").
(function () {
  "use strict";

  function draw() {
    const data = document.getElementById("leaderboard-data");
    const canvas = document.getElementById("chart-leaderboard");
    if (!data || !canvas || !window.Chart) return;
    const models = JSON.parse(data.textContent);
    new window.Chart(canvas, {
      data: {
        labels: models.map((m) => m.name),
        datasets: [
          {
            type: "bar",
            label: "95 % interval",
            data: models.map((m) => [m.ci_low, m.ci_high]),
            backgroundColor: "rgba(47, 91, 211, 0.25)",
            borderColor: "#2f5bd3",
            borderWidth: 1,
          },
          {
            type: "scatter",
            label: "score",
            data: models.map((m) => ({ x: m.name, y: m.score })),
            backgroundColor: "#1d2939",
            pointRadius: 5,
          },
        ],
      },
      options: {
        animation: false,
        scales: { y: { title: { display: true, text: "log-odds against base" } } },
      },
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", draw);
  else draw();
})();
