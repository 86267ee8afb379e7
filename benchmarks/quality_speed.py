"""How fast the quality figures are on a large project.

Usage: python benchmarks/quality_speed.py [--prompts 100000] [--overlap 3] [--annotators 50] [--calls 5]
                                          [--modes pairwise,ranking] [--no-write]

It builds a fresh SQLite database (the production settings, as benchmarks/annotate_speed.py does, with
its fast seeding: explicit ids through executemany, no model instances) with a project per mode of N
prompts, every item judged by `overlap` of the annotators (N x overlap judgements: 300,000 at the
defaults), each judgement on a lease taken 1 to 60 seconds before it. The annotators behave as people
and bad annotators do: most prefer the better completion 85 % of the time, some choose at random,
some always choose "A", and some answer in about a second. A ranking project has K = 4 completions
per prompt (four ranked completions per judgement); a pairwise project one pair per prompt.

Then, through Django's full request handling in this process (session auth, DRF, the selector; no
network), it times GET /api/v1/projects/{slug}/quality/ unfiltered: the first call (nothing
cached: the full pass), then `calls` calls served from the cache, the Quality page once, one
request with the cached figures past their maximum age (a full pass under half a second is
redone in the request; a slower one is served marked stale and its recompute queued),
and the API once with each kind of filter (computed in the request). Last, outside a request, the full
refresh the worker runs (`quality_figures_refresh`, each annotator's reliability included) and the
reliability estimate alone (`project_reliability`). The figures go to benchmarks/RESULTS.md
(## Quality figures), with the machine, the load average and the method.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.annotate_speed import ASSIGNMENT_FIELDS, _insert, setup_django, write_results  # noqa: E402

SECTION = "## Quality figures"
K_RANKING = 4


def _insert_all(model, names: list[str], rows: list[tuple]) -> None:
    """annotate_speed's insert, with every other field that has a default given it (no row relies on the database)."""
    rest = [
        f
        for f in model._meta.concrete_fields
        if f.name not in names and (f.has_default() or not f.null) and not f.primary_key
    ]
    defaults = tuple(f.get_default() for f in rest)
    _insert(model, [*names, *(f.name for f in rest)], [(*row, *defaults) for row in rows])


def behaviour(n: int, annotators: int) -> str:
    """Annotator n's habit: one in ten at random, one in twenty-five always "A", one in twenty-five hasty."""
    if n % 10 == 9:
        return "random"
    if n % 25 == 3:
        return "always_a"
    if n % 25 == 7:
        return "hasty"
    return "careful"


def seed(*, mode: str, prompts: int, overlap: int, annotator_ids: list[int]) -> str:
    from django.db import transaction
    from django.utils import timezone

    from feedback.models import (
        Assignment,
        Completion,
        Membership,
        ModelVersion,
        PairwiseJudgement,
        Project,
        Prompt,
        RankedCompletion,
        RankingJudgement,
        Round,
        RoundPrompt,
    )

    rng = random.Random(16)
    now = timezone.now()
    k = K_RANKING if mode == "ranking" else 2
    project = Project.objects.create(
        name=f"Quality {mode}", slug=f"quality-{mode}", mode=mode, completions_per_prompt=k, overlap=overlap
    )
    Membership.objects.bulk_create(Membership(user_id=pk, project=project) for pk in annotator_ids)
    version = ModelVersion.objects.create(project=project, name="v1", weights_path="versions/v1")
    the_round = Round.objects.create(project=project, number=1, writers=["v1"], status=Round.Status.DONE)
    habits = {pk: behaviour(n, len(annotator_ids)) for n, pk in enumerate(annotator_ids)}
    ids = {
        name: (model.objects.order_by("-pk").values_list("pk", flat=True).first() or 0)
        for name, model in (
            ("prompt", Prompt),
            ("completion", Completion),
            ("assignment", Assignment),
            ("judgement", RankingJudgement if mode == "ranking" else PairwiseJudgement),
        )
    }
    started = time.perf_counter()
    batch = 10_000
    for start in range(0, prompts, batch):
        prompt_rows, round_prompt_rows, completion_rows, assignment_rows, judgement_rows, ranked_rows = (
            [],
            [],
            [],
            [],
            [],
            [],
        )
        for n in range(start, min(start + batch, prompts)):
            ids["prompt"] += 1
            prompt_id = ids["prompt"]
            prompt_rows.append(
                (
                    prompt_id,
                    project.pk,
                    [{"role": "user", "content": f"Question {n}?"}],
                    "",
                    {"topic": f"t{n % 5}"},
                    now,
                )
            )
            round_prompt_rows.append((the_round.pk, prompt_id, overlap))
            mine = []
            for j in range(k):
                ids["completion"] += 1
                mine.append(ids["completion"])
                completion_rows.append(
                    (ids["completion"], prompt_id, the_round.pk, f"Answer {j}", f"<p>Answer {j}</p>", version.pk, now)
                )
            truth = rng.sample(mine, k)  # best first
            for slot, annotator in enumerate(rng.sample(annotator_ids, overlap)):
                ids["assignment"] += 1
                ids["judgement"] += 1
                habit = habits[annotator]
                order = rng.sample(mine, k)  # as shown
                seconds = rng.uniform(0.5, 2.0) if habit == "hasty" else rng.uniform(5, 60)
                leased_at = now - timedelta(seconds=seconds)
                key = f"p{prompt_id}-r{the_round.pk}" if mode == "ranking" else f"c{mine[0]}-{mine[1]}"
                a, b = (None, None) if mode == "ranking" else (order[0], order[1])
                assignment_rows.append(
                    (
                        ids["assignment"],
                        project.pk,
                        annotator,
                        prompt_id,
                        the_round.pk,
                        a,
                        b,
                        key,
                        slot,
                        order,
                        "done",
                        "",
                        now,
                        leased_at,
                        now,
                    )
                )
                base = (ids["judgement"], project.pk, annotator, ids["assignment"], prompt_id, the_round.pk)
                client_uuid = uuid.UUID(int=rng.getrandbits(128))
                if mode == "ranking":
                    if habit == "always_a":
                        ranking = order
                    elif habit in ("random", "hasty"):
                        ranking = rng.sample(mine, k)
                    else:
                        ranking = list(truth)
                        if rng.random() < 0.15:
                            i = rng.randrange(k - 1)
                            ranking[i], ranking[i + 1] = ranking[i + 1], ranking[i]
                    judgement_rows.append((*base, "", int(seconds * 1000), client_uuid, now))
                    place = {c: r for r, c in enumerate(ranking, start=1)}
                    ranked_rows += [(ids["judgement"], c, place[c], p) for p, c in enumerate(order)]
                else:
                    better = truth[0]
                    if habit == "always_a":
                        choice = "a"
                    elif habit in ("random", "hasty"):
                        choice = rng.choice(["a", "b", "a", "b", "tie", "both_bad"])
                    else:
                        right = "a" if order[0] == better else "b"
                        roll = rng.random()
                        choice = right if roll < 0.85 else ("tie" if roll < 0.9 else {"a": "b", "b": "a"}[right])
                    judgement_rows.append(
                        (*base, order[0], order[1], key, choice, "", "", int(seconds * 1000), client_uuid, now)
                    )
        with transaction.atomic():
            _insert_all(Prompt, ["id", "project", "messages", "external_id", "metadata", "created_at"], prompt_rows)
            _insert_all(RoundPrompt, ["round", "prompt", "judgement_count"], round_prompt_rows)
            _insert_all(
                Completion,
                ["id", "prompt", "round", "text", "html", "model_version", "created_at"],
                completion_rows,
            )
            _insert_all(
                Assignment,
                ASSIGNMENT_FIELDS,
                assignment_rows,
            )
            common = ["id", "project", "annotator", "assignment", "prompt", "round"]
            if mode == "ranking":
                _insert_all(
                    RankingJudgement, [*common, "rationale", "time_ms", "client_uuid", "created_at"], judgement_rows
                )
                _insert_all(RankedCompletion, ["judgement", "completion", "rank", "position"], ranked_rows)
            else:
                _insert_all(
                    PairwiseJudgement,
                    [
                        *common,
                        "left",
                        "right",
                        "item_key",
                        "choice",
                        "strength",
                        "rationale",
                        "time_ms",
                        "client_uuid",
                        "created_at",
                    ],
                    judgement_rows,
                )
    print(
        f"seeded {mode}: {prompts} prompts, {prompts * overlap} judgements in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return project.slug


def measure(*, slug: str, viewer, calls: int) -> dict[str, object]:
    from django.test import Client

    client = Client()
    client.force_login(viewer)
    url = f"/api/v1/projects/{slug}/quality/"

    def timed(path: str) -> tuple[float, object]:
        start = time.perf_counter()
        response = client.get(path)
        elapsed = time.perf_counter() - start
        assert response.status_code == 200, (path, response.status_code, response.content[:300])
        return elapsed, response

    from feedback.selectors import quality

    full_pass, warm = timed(url)  # nothing cached yet: the full pass, computed in the request
    body = warm.json()
    unfiltered = [timed(url)[0] for _ in range(calls)]  # from the cache, its stamp checked
    page, _ = timed(f"/projects/{slug}/quality/")
    max_age, quality.MAX_AGE = quality.MAX_AGE, timedelta(0)  # every cached figure is now too old
    stale, stale_response = timed(url)  # a fast pass is redone in the request, a slow one queued for the worker
    quality.MAX_AGE = max_age
    stale_served = "served marked stale, recompute queued" if stale_response.json()["stale"] else "recomputed"
    filtered = {
        name: timed(f"{url}?{query}")[0]
        for name, query in (
            ("date range", "created_from=2000-01-01&created_before=2100-01-01"),
            ("model version", "model_version=v1"),
            ("metadata value", "metadata_key=topic&metadata_value=t1"),
        )
    }
    flagged = {a["username"]: sorted(f["code"] for f in a["flags"]) for a in body["annotators"] if a["flags"]}

    from feedback.models import Project
    from feedback.selectors.reliability import project_reliability

    project = Project.objects.get(slug=slug)
    start = time.perf_counter()
    quality.quality_figures_refresh(project=project)
    refresh = time.perf_counter() - start
    start = time.perf_counter()
    reliability = project_reliability(project=project)
    estimate = time.perf_counter() - start
    return {
        "body": body,
        "full_pass": full_pass,
        "unfiltered": unfiltered,
        "page": page,
        "stale": stale,
        "stale_served": stale_served,
        "filtered": filtered,
        "flagged": flagged,
        "refresh": refresh,
        "estimate": estimate,
        "iterations": reliability.iterations,
        "pairs": reliability.pairs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument("--overlap", type=int, default=3)
    parser.add_argument("--annotators", type=int, default=50)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--modes", default="pairwise,ranking")
    parser.add_argument("--no-write", action="store_true", help="print the figures, leave RESULTS.md alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rankwise-quality-") as data_dir:
        setup_django(Path(data_dir))
        from django.conf import settings

        # the page's static links without collectstatic's manifest (the files are not served here)
        settings.STORAGES = {
            **settings.STORAGES,
            "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
        }
        from django.contrib.auth import get_user_model

        user_model = get_user_model()
        people = [user_model(username=f"annotator-{n:02d}") for n in range(args.annotators)]
        for person in people:
            person.set_unusable_password()
        user_model.objects.bulk_create(people)
        annotator_ids = list(user_model.objects.order_by("pk").values_list("pk", flat=True))
        viewer = user_model.objects.create(username="viewer", is_staff=True)
        lines = []
        for mode in args.modes.split(","):
            slug = seed(mode=mode, prompts=args.prompts, overlap=args.overlap, annotator_ids=annotator_ids)
            figures = measure(slug=slug, viewer=viewer, calls=args.calls)
            body = figures["body"]
            times = figures["unfiltered"]
            agreement = body["agreement"]
            line = (
                f"- **{mode}**, {args.prompts:,} prompts, {body['judgements']:,} judgements, "
                f"{len(body['annotators'])} annotators: unfiltered API from the cache median "
                f"{statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f}, {len(times)} calls), "
                f"the page {figures['page']:.3f} s, a stale request ({figures['stale_served']}) "
                f"{figures['stale']:.3f} s; the full pass (the first call, nothing cached) "
                f"{figures['full_pass']:.2f} s; "
                "filtered (computed in the request): "
                + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in figures["filtered"].items())
                + f". Alpha {agreement['alpha']:.3f} ({agreement['level']}) over {agreement['units']:,} units; "
                f"flagged: {len(figures['flagged'])} annotators "
                f"({', '.join(sorted({c for codes in figures['flagged'].values() for c in codes}))}). "
                f"The full refresh (quality_figures_refresh, outside a request) {figures['refresh']:.2f} s, of which "
                f"the reliability estimate {figures['estimate']:.2f} s ({figures['pairs']:,} pairs, "
                f"{figures['iterations']} EM iterations); reliability mean {body['reliability_mean']:.3f}, "
                f"unreliable: {sum('unreliable' in codes for codes in figures['flagged'].values())} annotators."
            )
            print(line, flush=True)
            lines.append(line)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    command = "python benchmarks/quality_speed.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            SECTION,
            "",
            f"`{command.strip()}` on {platform.machine()} with {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, SQLite (WAL); {time.strftime('%Y-%m-%d')}. Load average when the run "
            f"ended: {load} (other work shared the machine's cores).",
            "",
            "Method: a fresh database seeded in bulk (benchmarks/annotate_speed.py's inserts), every item judged by "
            "the overlap's worth of 50 annotators of known habits; each figure is the server-side time of a GET "
            "through Django's full request handling in the benchmark's process (session auth, DRF, "
            "feedback/selectors/quality.py's aggregating queries), no network. The unfiltered figures are cached "
            "(the file cache in the data dir, as in production without Redis): the first call computes them, "
            "later ones read them and check their stamp (judgement and skip counts, exclusions); a stale request is "
            "timed with the figures made older than the maximum age. The full refresh and the reliability estimate "
            "are timed once each in the same process after the requests.",
            "",
            *lines,
        ]
    )
    if args.no_write:
        print(text)
    else:
        write_results(text, SECTION)


if __name__ == "__main__":
    main()
