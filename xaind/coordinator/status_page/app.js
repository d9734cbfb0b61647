// The coordinator's status page: polls the JSON `status` beside it and draws it, without reloading.
// Everything shown comes from that document; text is only ever set as text, never as markup.
"use strict";

(() => {
  /** Milliseconds between two polls, and how long one may take before it counts as unanswered. */
  const POLL_INTERVAL_MS = 1000;
  const POLL_TIMEOUT_MS = 4000;
  const STATES = ["waiting", "selected", "done", "done_inactive", "ignored"];
  const CHART = { width: 720, height: 240, left: 46, right: 40, top: 12, bottom: 30 };

  const byId = (id) => document.getElementById(id);
  const chart = byId("chart");
  // The inline <svg> is in SVG's namespace already: its elements are made in the same one.
  const SVG = chart.namespaceURI;

  let lastAnswerAt = null; // Date of the last answer
  let polls = 0;
  let aggregatedAgo = null; // {seconds, at}: seconds since the last aggregation when asked, and when asked
  let shownRounds = ""; // what the chart shows, to redraw only when it changes
  let shownProblems = "";

  function setText(id, text) {
    const element = byId(id);
    if (element.textContent !== text) {
      element.textContent = text;
    }
  }

  function duration(seconds) {
    if (seconds < 60) {
      return `${seconds < 10 ? seconds.toFixed(1) : Math.round(seconds)} s`;
    }
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) {
      return `${minutes} min ${Math.floor(seconds % 60)} s`;
    }
    return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
  }

  function clockTime(epochSeconds) {
    return new Date(epochSeconds * 1000).toLocaleTimeString([], { hour12: false });
  }

  // -- the connection ---------------------------------------------------------------------------

  function connected() {
    lastAnswerAt = new Date();
    polls += 1;
    document.body.dataset.connection = "live";
    document.body.dataset.polls = String(polls);
    setText("connection", `live · updated ${lastAnswerAt.toLocaleTimeString([], { hour12: false })}`);
  }

  function lost(reason) {
    document.body.dataset.connection = "lost";
    const since = lastAnswerAt === null ? "" : `; last answer at ${lastAnswerAt.toLocaleTimeString([], { hour12: false })}, shown below`;
    setText("connection", `the coordinator is not answering (${reason})${since}`);
  }

  // -- the parts of the page ----------------------------------------------------------------------

  function drawTraining(status) {
    setText("round", String(status.round));
    setText("rounds", String(status.rounds));
    setText("phase", status.phase);
    const done = Math.min(status.round, status.rounds);
    const progress = byId("progress");
    progress.max = status.rounds;
    progress.value = done;
    const percent = status.rounds > 0 ? Math.floor((100 * done) / status.rounds) : 0;
    setText("progress-text", `${done} of ${status.rounds} rounds done (${percent} %)`);
    setText("waiting-for", status.waiting_for);
    const failure = status.state_write_failure;
    const failureLine = byId("state-write-failure");
    failureLine.hidden = failure === null || failure === undefined;
    if (!failureLine.hidden) {
      setText("state-write-failure", `The round counter could not be written: ${failure.error} (${failure.attempts} attempt(s))`);
    }
    document.title = `xaind · round ${status.round} of ${status.rounds} · ${status.phase}`;
  }

  function drawParticipants(status) {
    const counts = status.participants;
    const total = STATES.reduce((sum, state) => sum + counts[state], 0);
    for (const state of STATES) {
      setText(`count-${state}`, String(counts[state]));
      const segment = byId("participant-bar").querySelector(`[data-state="${state}"]`);
      segment.style.flexGrow = String(total > 0 ? counts[state] : 0);
      segment.title = `${state}: ${counts[state]}`;
    }
    setText("minimum", String(status.minimum_participants));
    setText("watched", String(status.watched_participants));
  }

  function drawAggregator(status) {
    const link = byId("link");
    link.dataset.attached = String(status.aggregator_attached);
    setText("link", status.aggregator_attached ? "attached" : "not attached");
    const seconds = status.seconds_since_last_aggregation;
    aggregatedAgo = seconds === null || seconds === undefined ? null : { seconds, at: Date.now() };
    drawSinceAggregation();
    const latency = status.selection_to_start_training;
    setText(
      "latency",
      latency.count > 0 ? `median ${Math.round(latency.p50_ms)} ms, p99 ${Math.round(latency.p99_ms)} ms (${latency.count})` : "none yet",
    );
  }

  /** Counts on between polls, so that it reads as a clock. */
  function drawSinceAggregation() {
    if (aggregatedAgo === null) {
      setText("since-aggregation", "none yet");
      return;
    }
    const seconds = aggregatedAgo.seconds + (Date.now() - aggregatedAgo.at) / 1000;
    setText("since-aggregation", `${duration(seconds)} ago`);
  }

  function svg(name, attributes, parent) {
    const element = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) {
      element.setAttribute(key, String(value));
    }
    parent.appendChild(element);
    return element;
  }

  /** A round upper bound for an axis: 1, 2 or 5 times a power of ten. */
  function niceCeiling(value) {
    if (!(value > 0)) {
      return 1;
    }
    const power = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 5, 10]) {
      if (value <= step * power) {
        return step * power;
      }
    }
    return 10 * power;
  }

  function drawChart(finished) {
    const key = JSON.stringify(finished.map((round) => [round.round, round.duration_s, round.participants, round.outcome]));
    if (key === shownRounds) {
      return;
    }
    shownRounds = key;
    chart.replaceChildren();
    byId("chart-empty").hidden = finished.length > 0;
    chart.dataset.rounds = String(finished.length);
    if (finished.length === 0) {
      return;
    }
    const { width, height, left, right, top, bottom } = CHART;
    const plotWidth = width - left - right;
    const plotHeight = height - top - bottom;
    const maxDuration = niceCeiling(Math.max(...finished.map((round) => round.duration_s)));
    const maxResults = niceCeiling(Math.max(1, ...finished.map((round) => round.participants)));
    const slot = plotWidth / finished.length;
    const x = (index) => left + index * slot;
    const yDuration = (seconds) => top + plotHeight * (1 - seconds / maxDuration);
    const yResults = (count) => top + plotHeight * (1 - count / maxResults);

    // Axes, with their top and bottom values.
    svg("line", { class: "axis", x1: left, y1: top + plotHeight, x2: width - right, y2: top + plotHeight }, chart);
    svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: top + plotHeight }, chart);
    svg("line", { class: "axis", x1: width - right, y1: top, x2: width - right, y2: top + plotHeight }, chart);
    const label = (text, attributes) => {
      svg("text", attributes, chart).textContent = text;
    };
    label(`${maxDuration} s`, { x: left - 4, y: top + 10, "text-anchor": "end" });
    label("0", { x: left - 4, y: top + plotHeight, "text-anchor": "end" });
    label(String(maxResults), { x: width - right + 4, y: top + 10 });
    label("0", { x: width - right + 4, y: top + plotHeight });
    label("duration", { x: 4, y: top + plotHeight / 2 });
    label("results", { x: width - 2, y: top + plotHeight / 2, "text-anchor": "end" });

    // A bar per round: its duration.
    const barWidth = Math.max(1, Math.min(slot * 0.7, 40));
    finished.forEach((round, index) => {
      const y = yDuration(round.duration_s);
      const bar = svg(
        "rect",
        { class: `bar ${round.outcome}`, x: x(index) + (slot - barWidth) / 2, y, width: barWidth, height: Math.max(0, top + plotHeight - y) },
        chart,
      );
      svg("title", {}, bar).textContent =
        `round ${round.round}: ${duration(round.duration_s)}, ${round.participants} result(s), ${round.outcome}, ended ${clockTime(round.ended_at)}`;
    });

    // Round numbers under the axis: a few, evenly spread.
    const every = Math.max(1, Math.ceil(finished.length / 12));
    finished.forEach((round, index) => {
      if (index % every === 0 || index === finished.length - 1) {
        label(String(round.round), { x: x(index) + slot / 2, y: height - bottom + 16, "text-anchor": "middle" });
      }
    });
    label("round", { x: left + plotWidth / 2, y: height - 2, "text-anchor": "middle" });

    // The results counted, as a line with a dot per round.
    const points = finished.map((round, index) => `${(x(index) + slot / 2).toFixed(1)},${yResults(round.participants).toFixed(1)}`);
    svg("polyline", { class: "results", points: points.join(" ") }, chart);
    if (finished.length <= 60) {
      finished.forEach((round, index) => {
        svg("circle", { class: "result", cx: x(index) + slot / 2, cy: yResults(round.participants), r: 3 }, chart);
      });
    }
  }

  function drawProblems(problems) {
    const key = JSON.stringify(problems);
    if (key === shownProblems) {
      return;
    }
    shownProblems = key;
    const list = byId("problems");
    list.replaceChildren();
    byId("no-problems").hidden = problems.length > 0;
    // Newest first.
    for (const problem of [...problems].reverse()) {
      const item = document.createElement("li");
      const time = document.createElement("time");
      time.textContent = problem.time === null ? "–" : clockTime(problem.time);
      if (problem.time !== null) {
        time.dateTime = new Date(problem.time * 1000).toISOString();
      }
      const level = document.createElement("span");
      level.className = `level ${problem.level}`;
      level.textContent = problem.level;
      const text = document.createElement("span");
      text.className = "text";
      const source = document.createElement("span");
      source.className = "source";
      source.textContent = `${problem.source}: `;
      text.append(source, problem.text);
      item.append(time, level, text);
      list.appendChild(item);
    }
  }

  function draw(status) {
    drawTraining(status);
    drawParticipants(status);
    drawAggregator(status);
    drawChart(status.finished_rounds || []);
    drawProblems(status.recent_problems || []);
  }

  // -- polling --------------------------------------------------------------------------------------

  /** The status document, or null (the connection marked lost) when the coordinator did not answer it. */
  async function fetchStatus() {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), POLL_TIMEOUT_MS);
    try {
      const response = await fetch("status", { cache: "no-store", headers: { accept: "application/json" }, signal: controller.signal });
      if (!response.ok) {
        throw new Error(`HTTP ${response.status}`);
      }
      return await response.json();
    } catch (error) {
      lost(error.name === "AbortError" ? `no answer within ${POLL_TIMEOUT_MS / 1000} s` : error.message || String(error));
      return null;
    } finally {
      clearTimeout(timer);
    }
  }

  async function poll() {
    try {
      const status = await fetchStatus();
      if (status !== null) {
        draw(status);
        connected();
      }
    } catch (error) {
      // A document this page cannot draw (a newer coordinator?): said as such, not as a lost connection.
      document.body.dataset.connection = "lost";
      setText("connection", `cannot draw the coordinator's status: ${error.message || error}`);
    } finally {
      // The next poll once this one is over: a slow coordinator is never asked twice at once.
      setTimeout(poll, POLL_INTERVAL_MS);
    }
  }

  setInterval(drawSinceAggregation, 1000);
  poll();
})();
